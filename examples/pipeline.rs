//! The pipeline in one program: a worker behind five layers (filter, upcast, validate,
//! de-duplicate, rate limit), a router for several event types, a content router, a
//! ledger kept in order per account through a retry, and a batch worker.
//!
//! ```text
//! cargo run --example pipeline     # in memory; set AMQP_URL to use RabbitMQ
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::middleware::{
    DedupLayer, FilterLayer, OrderKey, OrderedLayer, RateLimitLayer, UpcastLayer, ValidateLayer,
};
use rabbitry::observe::{Handling, Observer, Settled};
use rabbitry::prelude::*;
use rabbitry::{BatchLimits, BatchWorker, Condition, ContentRouter, Rate, Registration, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

/// Version 2 of `order.placed`: version 1 had `amount` and no currency.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct OrderPlaced {
    order_id: u64,
    total: f64,
    currency: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
    const VERSION: u32 = 2;
}

/// What an old producer still sends.
#[derive(Serialize)]
struct OrderPlacedV1 {
    order_id: u64,
    amount: f64,
}

impl Event for OrderPlacedV1 {
    const TYPE: &'static str = "order.placed";
}

/// A producer with a bug: the total is text.
#[derive(Serialize)]
struct BrokenOrder {
    order_id: u64,
    total: &'static str,
    currency: &'static str,
}

impl Event for BrokenOrder {
    const TYPE: &'static str = "order.placed";
    const VERSION: u32 = 2;
}

/// Bills orders, behind five layers.
struct Billing;

impl Worker for Billing {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        Subscription::new("demo.pipeline.billing").bind(OrderPlaced::TYPE)
    }

    async fn handle(&self, order: Delivery<OrderPlaced>, _ctx: &Context) -> Outcome {
        println!(
            "billing: order {} for {:.2} {}",
            order.order_id, order.total, order.currency
        );
        Ok(())
    }
}

fn billing() -> Result<Registration, rabbitry::Error> {
    Ok(Registration::new(Billing)
        // Test traffic is not billed (skipped, not failed).
        .layer(FilterLayer::new(Condition::header("x-test", "true").not()).reason("test order"))
        // Old producers: v1 → v2.
        .layer(UpcastLayer::of::<OrderPlaced>().step(1, |mut v| {
            if let Some(amount) = v.as_object_mut().and_then(|o| o.remove("amount")) {
                v["total"] = amount;
            }
            v["currency"] = json!("EUR");
            v
        }))
        // Then the contract of v2, derived from the type.
        .layer(ValidateLayer::of::<OrderPlaced>()?)
        // The same order id twice is billed once.
        .layer(DedupLayer::new())
        // The payment provider takes 50 a second.
        .layer(RateLimitLayer::new(Rate::per_second(50)?.burst(10))))
}

#[derive(Debug, Serialize, Deserialize)]
struct Dispatched {
    order_id: u64,
    carrier: String,
}

impl Event for Dispatched {
    const TYPE: &'static str = "shipment.dispatched";
}

#[derive(Debug, Serialize, Deserialize)]
struct Delivered {
    order_id: u64,
}

impl Event for Delivered {
    const TYPE: &'static str = "shipment.delivered";
}

#[derive(Debug, Serialize, Deserialize)]
struct Lost {
    order_id: u64,
}

impl Event for Lost {
    const TYPE: &'static str = "shipment.lost";
}

async fn dispatched(d: Delivery<Dispatched>, _ctx: Context) -> Outcome {
    println!(
        "shipments: order {} dispatched with {}",
        d.order_id, d.carrier
    );
    Ok(())
}

async fn delivered(d: Delivery<Delivered>, _ctx: Context) -> Outcome {
    println!("shipments: order {} delivered", d.order_id);
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct LedgerEntry {
    account: String,
    seq: u32,
    amount: i64,
}

impl Event for LedgerEntry {
    const TYPE: &'static str = "ledger.entry";
}

/// Books entries in order per account. The first try of acme's first entry fails.
struct Ledger {
    failed_once: Mutex<bool>,
}

impl Worker for Ledger {
    type Event = LedgerEntry;

    fn subscription(&self) -> Subscription {
        Subscription::new("demo.pipeline.ledger")
            .bind(LedgerEntry::TYPE)
            .retry(RetryPolicy::exponential(Duration::from_millis(300)))
    }

    async fn handle(&self, e: Delivery<LedgerEntry>, _ctx: &Context) -> Outcome {
        if e.account == "acme"
            && e.seq == 1
            && !std::mem::replace(&mut *self.failed_once.lock().unwrap(), true)
        {
            println!(
                "ledger: {} #{} failed (lock timeout); retrying, later acme entries wait",
                e.account, e.seq
            );
            return Err("ledger lock timeout".into());
        }
        println!("ledger: {} #{} booked ({:+})", e.account, e.seq, e.amount);
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PageView {
    page: String,
}

impl Event for PageView {
    const TYPE: &'static str = "analytics.page-view";
}

/// Stores page views ten at a time.
struct Analytics;

impl BatchWorker for Analytics {
    type Event = PageView;

    fn subscription(&self) -> Subscription {
        Subscription::new("demo.pipeline.analytics").bind(PageView::TYPE)
    }

    fn batch(&self) -> BatchLimits {
        BatchLimits::new(10, Duration::from_millis(200))
    }

    async fn handle(&self, batch: Vec<Delivery<PageView>>, _ctx: &Context) -> Vec<Outcome> {
        println!("analytics: stored a batch of {} page views", batch.len());
        batch.iter().map(|_| Ok(())).collect()
    }
}

/// Large orders, as routed by the triage rules.
struct Review;

impl Worker for Review {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        Subscription::new("demo.pipeline.review").bind("order.review")
    }

    async fn handle(&self, order: Delivery<OrderPlaced>, _ctx: &Context) -> Outcome {
        println!(
            "review: order {} ({:.2}) needs a second look",
            order.order_id, order.total
        );
        Ok(())
    }
}

/// Counts how each worker's deliveries ended, to know when the demo is done.
#[derive(Default)]
struct Tally {
    done: Mutex<HashMap<String, HashMap<&'static str, usize>>>,
    changed: Notify,
}

impl Observer for Tally {
    fn settled(&self, s: &Settled<'_>) {
        if let Handling::DeadLettered { reason, .. } = s.handling {
            println!(
                "{}: dead-lettered: {reason}",
                s.worker.trim_start_matches("demo.pipeline.")
            );
        }
        let mut done = self.done.lock().unwrap();
        *done
            .entry(s.worker.to_owned())
            .or_default()
            .entry(s.handling.as_str())
            .or_default() += 1;
        self.changed.notify_waiters();
    }
}

impl Tally {
    /// Settled for good (handled, skipped or dead-lettered) by `worker`.
    fn finished(&self, worker: &str) -> usize {
        let done = self.done.lock().unwrap();
        done.get(worker).map_or(0, |h| {
            ["handled", "skipped", "dead_lettered"]
                .iter()
                .map(|k| h.get(k).copied().unwrap_or(0))
                .sum()
        })
    }

    async fn wait(&self, expected: &[(&str, usize)]) -> bool {
        let all_done = || expected.iter().all(|(w, n)| self.finished(w) >= *n);
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if all_done() {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .is_ok()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let in_memory = rabbitry::MemoryBroker::new();
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| in_memory.url());
    println!(
        "{}",
        match url.starts_with("memory:") {
            true => "running on the in-memory broker (set AMQP_URL to use RabbitMQ)",
            false => "running on RabbitMQ",
        }
    );
    let tally = Arc::new(Tally::default());
    let shipments = Router::new(Subscription::new("demo.pipeline.shipments").bind("shipment.#"))
        .on(dispatched)
        .on(delivered)
        .skip_unknown();
    let triage =
        ContentRouter::new(Subscription::new("demo.pipeline.triage").bind(OrderPlaced::TYPE))
            .rule(Condition::field("/total").gt(500.0), "order.review");
    let ledger = Registration::new(Ledger {
        failed_once: Mutex::new(false),
    })
    .layer(
        OrderedLayer::new(OrderKey::Field("/account".into())).defer_for(Duration::from_millis(100)),
    );
    let runtime = Runtime::builder()
        .url(url)
        .exchange("demo.pipeline")
        .observer(tally.clone())
        .worker(billing()?)
        .worker(shipments)
        .worker(triage)
        .worker(Review)
        .worker(ledger)
        .worker(Registration::batch(Analytics))
        .start()
        .await?;
    let publisher = runtime.publisher();

    // Orders: a v2, a v1, the first again (same id), a test order, a broken one, a large one.
    publisher
        .message(&OrderPlaced {
            order_id: 1,
            total: 120.0,
            currency: "EUR".into(),
        })
        .message_id("order-1")
        .send()
        .await?;
    publisher
        .publish(&OrderPlacedV1 {
            order_id: 2,
            amount: 80.0,
        })
        .await?;
    publisher
        .message(&OrderPlaced {
            order_id: 1,
            total: 120.0,
            currency: "EUR".into(),
        })
        .message_id("order-1")
        .send()
        .await?;
    publisher
        .message(&OrderPlaced {
            order_id: 3,
            total: 1.0,
            currency: "EUR".into(),
        })
        .header("x-test", "true")
        .send()
        .await?;
    publisher
        .publish(&BrokenOrder {
            order_id: 4,
            total: "lots",
            currency: "EUR",
        })
        .await?;
    publisher
        .publish(&OrderPlaced {
            order_id: 5,
            total: 900.0,
            currency: "EUR".into(),
        })
        .await?;
    // Shipments, one of a type the router does not handle.
    publisher
        .publish(&Dispatched {
            order_id: 1,
            carrier: "DHL".into(),
        })
        .await?;
    publisher.publish(&Delivered { order_id: 1 }).await?;
    publisher.publish(&Lost { order_id: 2 }).await?;
    // Ledger entries: acme's must be booked in order, even though #1 fails once.
    for (account, seq, amount) in [
        ("acme", 1, 100),
        ("acme", 2, -30),
        ("globex", 1, 50),
        ("acme", 3, -20),
        ("globex", 2, 10),
    ] {
        publisher
            .publish(&LedgerEntry {
                account: account.into(),
                seq,
                amount,
            })
            .await?;
    }
    // Page views for the batch worker.
    let views: Vec<PageView> = (0..25)
        .map(|i| PageView {
            page: format!("/products/{i}"),
        })
        .collect();
    publisher.publish_batch(&views).await?;

    let expected = [
        ("demo.pipeline.billing", 6),
        ("demo.pipeline.shipments", 3),
        ("demo.pipeline.triage", 6),
        ("demo.pipeline.review", 1),
        ("demo.pipeline.ledger", 5),
        ("demo.pipeline.analytics", 25),
    ];
    let finished = tally.wait(&expected).await;
    runtime.shutdown().await;
    println!("\nhow each worker's deliveries ended:");
    let done = tally.done.lock().unwrap();
    for (worker, _) in expected {
        let mut counts: Vec<_> = done
            .get(worker)
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        counts.sort();
        println!(
            "  {:<10} {}",
            worker.trim_start_matches("demo.pipeline."),
            counts.join(", ")
        );
    }
    match finished {
        true => Ok(()),
        false => Err("not every delivery was settled within 30 s".into()),
    }
}
