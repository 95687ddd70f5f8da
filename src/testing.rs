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
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::broker::{BrokerMessage, MemoryBroker};
use crate::error::Result;
use crate::event::{Envelope, Event};
use crate::headers;
use crate::outcome::FailureKind;
use crate::publisher::Publisher;
use crate::runtime::{Runtime, RuntimeBuilder};
use crate::topology::dlq_name;

/// How the runtime settled one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handling {
    /// The handler succeeded; the message was acknowledged.
    Handled,
    /// The handler failed; a copy waits `delay` in a retry tier.
    Retried {
        /// The retry tier's delay.
        delay: Duration,
    },
    /// Sent to the worker's dead-letter queue.
    DeadLettered {
        /// The failure's kind (`x-exception-kind`).
        kind: FailureKind,
        /// The failure's message (`x-exception-message`, before truncation).
        reason: String,
    },
    /// The retry or dead-letter copy could not be stored; the message went back to its queue.
    Requeued,
}

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

/// Collects [`Record`]s from a runtime.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    records: Mutex<Vec<Record>>,
}

impl Recorder {
    pub(crate) fn record(&self, worker: &str, envelope: &Envelope, handling: Handling) {
        let record = Record {
            worker: worker.to_owned(),
            message_id: envelope.message_id().to_owned(),
            event_type: envelope.event_type().to_owned(),
            attempt: envelope.attempt(),
            handling,
            at: Instant::now(),
        };
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    fn all(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An in-memory broker and a runtime wired to it, for testing workers. See the
/// [module documentation](self) for a complete example.
///
/// Events go to the exchange `events`, as with a default runtime.
#[derive(Debug)]
pub struct TestBroker {
    broker: MemoryBroker,
    recorder: Arc<Recorder>,
    publisher: OnceCell<Publisher>,
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
            publisher: OnceCell::new(),
        }
    }

    /// The underlying broker, to inspect queues or publish raw bytes.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// A runtime builder connected to this broker, with a short shutdown grace period. Add
    /// workers and `start()` it.
    pub fn runtime(&self) -> RuntimeBuilder {
        Runtime::builder()
            .url(self.broker.url())
            .recorder(self.recorder.clone())
            .shutdown_grace(Duration::from_secs(1))
            .startup_timeout(Duration::from_secs(1))
            .reconnect_delay(Duration::from_millis(1), Duration::from_millis(50))
    }

    /// A publisher on this broker's `events` exchange (the runtime must have declared it).
    pub async fn publisher(&self) -> Result<&Publisher> {
        self.publisher
            .get_or_try_init(|| async {
                let url = self.broker.url();
                Publisher::connect(&url).await
            })
            .await
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
        self.recorder.all()
    }

    fn of(&self, worker: &str, keep: impl Fn(&Handling) -> bool) -> Vec<Record> {
        self.recorder
            .all()
            .into_iter()
            .filter(|r| r.worker == worker && keep(&r.handling))
            .collect()
    }

    /// The deliveries `worker` handled successfully.
    pub fn handled(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| *h == Handling::Handled)
    }

    /// The failed deliveries of `worker` that were scheduled for a retry, with their delay.
    pub fn retried(&self, worker: &str) -> Vec<Record> {
        self.of(worker, |h| matches!(h, Handling::Retried { .. }))
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
