//! The outbox, as an order service uses it: `place_order` saves the order and its
//! `order.placed` event in one SQLite transaction, and a relay publishes the event — so a
//! crash can never leave an order without its event, or an event without its order.
//!
//! ```text
//! cargo run -p rabbitry-store --example place_order            # in memory
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p rabbitry-store --example place_order
//! ```

use std::time::Duration;

use rabbitry::prelude::*;
use rabbitry::{MemoryBroker, Runtime};
use rabbitry_store::{Outbox, OutboxRelay, Store};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, SqliteConnection};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

/// The order service: its database, and the outbox in it.
struct OrderService {
    db: String,
    outbox: Outbox,
}

impl OrderService {
    /// Save the order and its event together: both or neither.
    async fn place_order(
        &self,
        customer: &str,
        total_cents: i64,
    ) -> Result<i64, Box<dyn std::error::Error>> {
        let mut conn = SqliteConnection::connect(&self.db).await?;
        let mut tx = conn.begin().await?;
        let order_id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (customer, total_cents) VALUES ($1, $2) RETURNING id",
        )
        .bind(customer)
        .bind(total_cents)
        .fetch_one(&mut *tx)
        .await?;
        let event = OrderPlaced {
            order_id,
            customer: customer.to_owned(),
            total_cents,
        };
        self.outbox.enqueue(&mut *tx, &event).await?;
        tx.commit().await?;
        Ok(order_id)
    }
}

/// Prints each order it is told about.
struct Billing(mpsc::UnboundedSender<OrderPlaced>);

impl Worker for Billing {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        Subscription::new("outbox-demo.billing").bind("order.placed")
    }

    async fn handle(&self, order: Delivery<OrderPlaced>, _ctx: &Context) -> Outcome {
        let _ = self.0.send(order.into_payload());
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let memory = MemoryBroker::new();
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| memory.url());
    let dir = std::env::temp_dir().join(format!("place-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}/orders.db", dir.display());

    // The store's migrations create the outbox table in the service's own database.
    let store = Store::connect(&db).await?;
    let mut conn = SqliteConnection::connect(&db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL)")
        .execute(&mut conn)
        .await?;

    let (tx, mut billed) = mpsc::unbounded_channel();
    let runtime = Runtime::builder()
        .url(url.clone())
        .exchange("outbox-demo")
        .worker(Billing(tx))
        .start()
        .await?;
    let service = OrderService {
        db: db.clone(),
        outbox: Outbox::new("outbox-demo"),
    };
    for (customer, total) in [("ada", 4_200), ("grace", 1_999), ("linus", 12_500)] {
        let id = service.place_order(customer, total).await?;
        println!("order {id} saved for {customer} (its event waits in the outbox)");
    }

    let relay = OutboxRelay::new(store.clone(), runtime.publisher().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = tokio::spawn(async move {
        relay
            .run(Duration::from_millis(100), async {
                let _ = stopped.await;
            })
            .await;
    });
    for _ in 0..3 {
        let order = tokio::time::timeout(Duration::from_secs(30), billed.recv())
            .await?
            .ok_or("billing stopped")?;
        println!(
            "billing got order {} ({} cents for {})",
            order.order_id, order.total_cents, order.customer
        );
    }
    let _ = stop.send(());
    relaying.await?;
    let pending: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM rabbitry_outbox WHERE sent_at IS NULL")
            .fetch_one(&mut conn)
            .await?;
    println!("outbox: {pending} event(s) pending");
    runtime.shutdown().await;
    store.close().await;
    std::fs::remove_dir_all(&dir)?;
    if pending != 0 {
        return Err("events left in the outbox".into());
    }
    Ok(())
}
