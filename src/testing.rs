//! Testing workers without RabbitMQ.
//!
//! [`TestBroker`] is an in-memory broker with RabbitMQ's semantics (routing, prefetch,
//! acknowledgements, priorities, retry tiers with time-to-live, dead-letter queues) plus a
//! runtime wired to it, and assertions on what the workers did: which messages were
//! handled, retried (with which delay) and dead-lettered (with which headers), and what
//! handlers published. A test that passes here means the same on RabbitMQ.
//!
//! Retry delays run on tokio's clock: with time paused (`#[tokio::test(start_paused = true)]`,
//! tokio's `test-util` feature), [`TestBroker::idle`] lets time jump to each retry, so a
//! five-attempt exponential schedule runs instantly.
//!
//! ```
//! use rabbitry::prelude::*;
//! use rabbitry::testing::{Handling, TestBroker};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced {
//!     order_id: u64,
//!     qty: i64,
//! }
//! impl Event for OrderPlaced {
//!     const TYPE: &'static str = "order.placed";
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct StockReserved {
//!     order_id: u64,
//! }
//! impl Event for StockReserved {
//!     const TYPE: &'static str = "stock.reserved";
//! }
//!
//! struct Inventory;
//! impl Worker for Inventory {
//!     type Event = OrderPlaced;
//!     fn subscription(&self) -> Subscription {
//!         Subscription::new("orders.inventory")
//!             .bind(OrderPlaced::TYPE)
//!             .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(3))
//!     }
//!     async fn handle(&self, order: Delivery<OrderPlaced>, ctx: &Context) -> Outcome {
//!         if order.qty <= 0 {
//!             return Err(Failure::reject("quantity must be positive"));
//!         }
//!         if order.attempt() == 1 && order.order_id == 2 {
//!             return Err(Failure::retry("stock service unavailable"));
//!         }
//!         let reserved = StockReserved { order_id: order.order_id };
//!         ctx.message(&reserved).allow_unroutable().send().await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> rabbitry::Result<()> {
//! // In a test: #[tokio::test(start_paused = true)]
//! let broker = TestBroker::new();
//! let runtime = broker.runtime().worker(Inventory).start().await?;
//! broker.publish(&OrderPlaced { order_id: 1, qty: 2 }).await?;
//! broker.publish(&OrderPlaced { order_id: 2, qty: 1 }).await?;
//! broker.publish(&OrderPlaced { order_id: 3, qty: 0 }).await?;
//! broker.idle().await; // every message handled, retried or dead-lettered
//!
//! assert_eq!(broker.handled("orders.inventory").len(), 2);
//! let retries = broker.retried("orders.inventory");
//! assert_eq!(retries[0].handling, Handling::Retried { delay: Duration::from_secs(1) });
//! let dead = broker.dead_letters("orders.inventory");
//! assert_eq!(dead[0].reason(), Some("quantity must be positive"));
//! assert_eq!(dead[0].kind(), Some("rejected"));
//! let reserved: Vec<StockReserved> = broker.published("stock.reserved");
//! assert_eq!(reserved.len(), 2);
//! runtime.shutdown().await;
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::broker::{BrokerMessage, MemoryBroker};
use crate::error::Result;
use crate::event::Event;
use crate::headers;
use crate::lock;
pub use crate::observe::Handling;
use crate::observe::{Lifecycle, Observer, Settled};
use crate::publisher::Publisher;
use crate::runtime::{Runtime, RuntimeBuilder};
use crate::topology::dlq_name;

/// One settled delivery.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record {
    /// The worker (its queue).
    pub worker: String,
    /// The message id.
    pub message_id: String,
    /// The event type.
    pub event_type: String,
    /// 1 on the first delivery, 2 on the first retry, …
    pub attempt: u32,
    /// How it was settled.
    pub handling: Handling,
    /// When (tokio time: with time paused, exact).
    pub at: Instant,
}

/// Collects [`Record`]s from a runtime, as an [`Observer`], and the exchange it runs on.
#[derive(Debug, Default)]
struct Recorder {
    records: Mutex<Vec<Record>>,
    exchange: Mutex<Option<String>>,
}

impl Observer for Recorder {
    fn settled(&self, settled: &Settled<'_>) {
        let meta = settled.metadata;
        let record = Record {
            worker: settled.worker.to_owned(),
            message_id: meta.message_id().to_owned(),
            event_type: meta.event_type().to_owned(),
            attempt: meta.attempt(),
            handling: settled.handling.clone(),
            at: Instant::now(),
        };
        lock(&self.records).push(record);
    }

    fn lifecycle(&self, event: &Lifecycle<'_>) {
        if let Lifecycle::Started { exchange } = event {
            *lock(&self.exchange) = Some((*exchange).to_owned());
        }
    }
}

/// An in-memory broker and a runtime wired to it, for testing workers. See the
/// [module documentation](self) for a complete example.
///
/// Events go to the exchange of the last runtime started with [`runtime`](TestBroker::runtime)
/// (`events` unless its builder says otherwise).
#[derive(Debug)]
pub struct TestBroker {
    broker: MemoryBroker,
    recorder: Arc<Recorder>,
    /// The publisher, and the exchange it publishes to.
    publisher: tokio::sync::Mutex<Option<(String, Publisher)>>,
}

impl Default for TestBroker {
    fn default() -> Self {
        TestBroker::new()
    }
}

impl TestBroker {
    /// A new, empty broker that records what is published to it.
    pub fn new() -> TestBroker {
        let broker = MemoryBroker::new();
        broker.record_published();
        TestBroker {
            broker,
            recorder: Arc::default(),
            publisher: tokio::sync::Mutex::new(None),
        }
    }

    /// The underlying broker, to inspect queues or publish raw bytes.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// A runtime builder connected to this broker, observed by it, with a short shutdown
    /// grace period. Add workers (and an exchange, layers, observers) and `start()` it.
    pub fn runtime(&self) -> RuntimeBuilder {
        Runtime::builder()
            .url(self.broker.url())
            .observer(self.recorder.clone())
            .shutdown_grace(Duration::from_secs(1))
            .startup_timeout(Duration::from_secs(1))
            .reconnect_delay(Duration::from_millis(1), Duration::from_millis(50))
    }

    /// The exchange events are published to: the last started runtime's.
    pub fn exchange(&self) -> String {
        lock(&self.recorder.exchange)
            .clone()
            .unwrap_or_else(|| "events".to_owned())
    }

    /// A publisher on [`exchange`](TestBroker::exchange) (a runtime must have declared it).
    pub async fn publisher(&self) -> Result<Publisher> {
        let exchange = self.exchange();
        let mut current = self.publisher.lock().await;
        if let Some((on, publisher)) = &*current
            && *on == exchange
        {
            return Ok(publisher.clone());
        }
        let publisher = Publisher::builder(self.broker.url())
            .exchange(exchange.clone())
            .connect()
            .await?;
        *current = Some((exchange, publisher.clone()));
        Ok(publisher)
    }

    /// Publish `event` as a producer would; returns its message id.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<String> {
        self.publisher().await?.publish(event).await
    }

    /// Wait until every published message has been handled, retried to the end or
    /// dead-lettered, and acknowledged. With time paused, retry delays pass instantly.
    pub async fn idle(&self) {
        self.broker.idle().await;
    }

    /// Every settled delivery, in order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.recorder.records).clone()
    }

    fn of(&self, worker: &str, keep: impl Fn(&Handling) -> bool) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.worker == worker && keep(&r.handling))
            .collect()
    }

    /// The deliveries `worker` handled successfully.
    pub fn handled(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| *h == Handling::Handled)
    }

    /// The deliveries of `worker` that a layer skipped.
    pub fn skipped(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| matches!(h, Handling::Skipped { .. }))
    }

    /// The failed deliveries of `worker` that were scheduled for a retry, with their delay.
    pub fn retried(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| matches!(h, Handling::Retried { .. }))
    }

    /// The deliveries of `worker` that a layer held back for later (`Disposition::Defer`,
    /// e.g. an ordered key waiting for its retried message), with their delay.
    pub fn deferred(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| matches!(h, Handling::Deferred { .. }))
    }

    /// The messages in `worker`'s dead-letter queue, oldest first (left in place).
    pub fn dead_letters(&self, worker: &str) -> Vec<DeadLetter> {
        self.broker
            .messages(&dlq_name(worker))
            .into_iter()
            .map(|message| DeadLetter { message })
            .collect()
    }

    /// The bodies of every message published with `routing_key` (by the test or by
    /// handlers), decoded as `T`; messages that do not decode are skipped.
    pub fn published<T: DeserializeOwned>(&self, routing_key: &str) -> Vec<T> {
        self.broker
            .published()
            .into_iter()
            .filter(|m| m.routing_key == routing_key)
            .filter_map(|m| serde_json::from_slice(&m.body).ok())
            .collect()
    }
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    message: BrokerMessage,
}

impl DeadLetter {
    /// The body, as it was received.
    pub fn body(&self) -> &[u8] {
        &self.message.body
    }

    /// The body decoded as JSON.
    pub fn decode<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.message.body)
    }

    /// A string header.
    pub fn header(&self, key: &str) -> Option<&str> {
        headers::get_str(self.message.properties.headers().as_ref(), key)
    }

    /// `x-exception-message`: why it failed.
    pub fn reason(&self) -> Option<&str> {
        self.header(headers::EXCEPTION_MESSAGE)
    }

    /// `x-exception-kind`: `transient`, `rejected`, `panic`, `timeout` or `undecodable`.
    pub fn kind(&self) -> Option<&str> {
        self.header(headers::EXCEPTION_KIND)
    }

    /// `x-retry-count`: the retries made before it was dead-lettered.
    pub fn retry_count(&self) -> Option<u64> {
        headers::get_u64(
            self.message.properties.headers().as_ref(),
            headers::RETRY_COUNT,
        )
    }

    /// All properties and headers.
    pub fn properties(&self) -> &BasicProperties {
        &self.message.properties
    }
}
