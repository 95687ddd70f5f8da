//! The order-domain demo: an order service publishes `order.placed` events, and the email,
//! inventory and analytics workers handle them in this process. The run shows fan-out, a
//! priority order overtaking, a retried failure and a dead-lettered invalid order, then the
//! order-fulfilment saga (with its stock and payment workers) confirming one order,
//! compensating a declined one and timing out one the payment gateway lost; prints a
//! summary, and exits 0.
//!
//! It uses its own exchange and queues (`demo.events`, `demo.orders.*`), so it never takes
//! messages from the real workers on the same broker.
//!
//! ```text
//! cargo run --example orders                                                  # in memory
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example orders   # on RabbitMQ
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use rabbitry::prelude::*;
use rabbitry::{MemoryBroker, MemorySagaRepository, redact_url};
use rabbitry_workers::analytics::{AnalyticsWorker, Stats};
use rabbitry_workers::email::{EmailWorker, Outbox};
use rabbitry_workers::fulfilment::{Payments, payment_worker, saga, stock_worker};
use rabbitry_workers::inventory::{InventoryWorker, Stock};
use rabbitry_workers::orders::OrderPlaced;

const EXCHANGE: &str = "demo.events";
const EMAIL: &str = "demo.orders.email";
const INVENTORY: &str = "demo.orders.inventory";
const ANALYTICS: &str = "demo.orders.analytics";
const FULFILMENT: &str = "demo.orders.fulfilment";
const STOCK: &str = "demo.orders.stock";
const PAYMENT: &str = "demo.orders.payment";
/// The saga's timeout in the demo (30 s in the real worker).
const SAGA_TIMEOUT: Duration = Duration::from_secs(2);
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    rabbitry_workers::init_tracing_at("error");
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    // RabbitMQ when AMQP_URL says where; otherwise an in-memory broker with the same
    // semantics, so the demo needs nothing but Rust (and no network).
    let in_memory = MemoryBroker::new();
    let url = match std::env::var("AMQP_URL") {
        Ok(url) => {
            println!(
                "rabbitry demo on RabbitMQ at {} (exchange {EXCHANGE})",
                redact_url(&url)
            );
            url
        }
        Err(_) => {
            println!(
                "rabbitry demo on the in-memory broker (set AMQP_URL=amqp://… to run it on RabbitMQ)"
            );
            in_memory.url()
        }
    };

    let outbox = Outbox::default();
    let stock = Stock::default();
    let stats = Stats::default();
    let inventory = InventoryWorker::new(INVENTORY, stock.clone())
        .retry(RetryPolicy::exponential(Duration::from_millis(500)).max_attempts(4));
    let rejections = inventory.rejections();
    // The fulfilment saga keeps its instances here (rabbitry-store's SagaStore in the
    // fulfilment-saga binary), with its own stock and payment services.
    let sagas = Arc::new(MemorySagaRepository::new());
    let saga_stock = Stock::default();
    let payments = Payments::default();
    payments.decline_over(1000.0);
    let runtime = Runtime::builder()
        .url(&url)
        .exchange(EXCHANGE)
        .worker(EmailWorker::new(EMAIL, outbox.clone()))
        .worker(inventory)
        .worker(AnalyticsWorker::new(ANALYTICS, stats.clone()))
        .worker(saga(sagas.clone(), FULFILMENT, SAGA_TIMEOUT))
        .worker(stock_worker(STOCK, saga_stock.clone()))
        .worker(payment_worker(PAYMENT, payments.clone()))
        .start()
        .await?;
    let orders = runtime.publisher();
    // Order ids of this run: leftovers of an interrupted earlier run never look like ours.
    let run = 1000 * (SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() % 1000 + 1);
    let order = |n: u64| OrderPlaced::sample(run + n);

    // 1. Fan-out: one event, three independent workers.
    orders.publish(&order(1)).await?;
    wait("the first order at every worker", || {
        sent_among(&outbox, run + 1..=run + 1).len() == 1
            && stock.reserved().contains(&(run + 1))
            && stats.totals().events.contains_key("order.placed")
    })
    .await?;
    println!(
        "1. fan-out     order {} -> email sent, stock reserved, analytics counted",
        run + 1
    );

    // 2. Priority: orders wait while the email worker is paused; the urgent one goes first.
    runtime.pause(EMAIL).await?;
    for n in 2..=5 {
        orders.publish(&order(n)).await?;
    }
    orders.message(&order(6)).priority(9).send().await?;
    runtime.resume(EMAIL).await?;
    wait("five more emails", || {
        sent_among(&outbox, run + 2..=run + 6).len() == 5
    })
    .await?;
    let sent = sent_among(&outbox, run + 2..=run + 6);
    println!(
        "2. priority    email paused; {}..{} (priority 0) and {} (priority 9) queued; sent in order {sent:?}",
        run + 2,
        run + 5,
        run + 6
    );
    if sent.first() != Some(&(run + 6)) {
        return Err(format!("the priority order should have gone first: {sent:?}").into());
    }

    // 3. Retry: the stock service is down for one call; the broker holds the retry.
    wait("inventory caught up", || {
        (1..=6).all(|n| stock.reserved().contains(&(run + n)))
    })
    .await?;
    stock.fail_next(1);
    let failed_at = Instant::now();
    orders.publish(&order(7)).await?;
    wait("order 7 reserved after a retry", || {
        stock.reserved().contains(&(run + 7))
    })
    .await?;
    println!(
        "3. retry       stock service unavailable for order {} (attempt 1); reserved on attempt 2, \
         {} ms later, after waiting in {INVENTORY}.retry.500",
        run + 7,
        failed_at.elapsed().as_millis()
    );

    // 4. Dead-letter: an invalid order is rejected without retries.
    let mut invalid = order(8);
    invalid.items[0].qty = 0;
    orders.publish(&invalid).await?;
    let rejected = || rejections.list().into_iter().find(|(id, _)| *id == run + 8);
    wait("order 8 rejected", || rejected().is_some()).await?;
    let reason = rejected().map(|(_, r)| r).unwrap_or_default();
    println!(
        "4. dead-letter order {} rejected to {INVENTORY}.dlq: {reason}",
        run + 8
    );

    // 5. Saga: reserve stock and charge for each order; confirm, compensate or time out.
    let (paid, declined, lost) = (run + 9, run + 10, run + 11);
    let mut expensive = order(10);
    expensive.total = 5000.0;
    payments.lose(lost);
    for placed in [order(9), expensive, order(11)] {
        orders.publish(&placed).await?;
    }
    let status = |id: u64| {
        sagas
            .records(FULFILMENT)
            .into_iter()
            .find(|r| r.key == id.to_string() && r.completed)
            .map(|r| r.status)
    };
    wait("the three sagas settled", || {
        [paid, declined, lost]
            .iter()
            .all(|id| status(*id).is_some())
    })
    .await?;
    let settled = [paid, declined, lost].map(|id| status(id).unwrap_or_default());
    println!(
        "5. saga        order {paid} {}: stock reserved, card charged; order {declined} {}: card declined, \
         stock released (compensation); order {lost} {}: no payment answer within {SAGA_TIMEOUT:?}, stock released",
        settled[0], settled[1], settled[2]
    );
    if settled != ["confirmed", "cancelled", "timed_out"] {
        return Err(format!("unexpected saga outcomes: {settled:?}").into());
    }

    wait("every email and count", || {
        sent_among(&outbox, run + 1..=run + 11).len() == 11
            && stats
                .totals()
                .events
                .get("order.placed")
                .is_some_and(|n| *n >= 11)
    })
    .await?;
    runtime.shutdown().await;

    let totals = stats.totals();
    println!();
    println!("summary");
    println!("  emails sent      {}", outbox.sent().len());
    println!(
        "  stock reserved   {} (after an outage: {:?})",
        stock.reserved().len(),
        stock.unavailable()
    );
    println!(
        "  rejected         {:?}",
        rejections
            .list()
            .iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    );
    for (event_type, n) in &totals.events {
        println!("  analytics        {event_type} x{n}");
    }
    println!("  revenue          {:.2}", totals.revenue);
    println!(
        "  sagas            {:?}",
        sagas
            .records(FULFILMENT)
            .iter()
            .map(|r| (r.key.as_str(), r.status.as_str()))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Order ids in `range`, in the order their emails were sent.
fn sent_among(outbox: &Outbox, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    outbox
        .sent()
        .iter()
        .map(|e| e.order_id)
        .filter(|id| range.contains(id))
        .collect()
}

/// Poll `done` until it holds, or give up after `PATIENCE`.
async fn wait(what: &str, done: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
