//! # rabbitry
//!
//! Typed, event-driven workers on RabbitMQ. Producers publish events to a topic exchange;
//! workers subscribe to event types, and the runtime does the rest: it declares the
//! topology, consumes with manual acknowledgements and bounded concurrency, retries
//! failures with exponential backoff held in the broker, dead-letters what cannot succeed
//! with the reason attached, reconnects by itself, and shuts down without losing a message.
//!
//! ## A worker
//!
//! A [`Worker`] takes one event type and returns an [`Outcome`]: `Ok(())` acknowledges the
//! message, an error retries it (any error converts with `?`), and [`Failure::reject`] sends
//! it to the dead-letter queue at once. A panic counts as a transient failure; it never takes
//! the worker down.
//!
//! ```
//! use rabbitry::prelude::*;
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct OrderPlaced {
//!     order_id: u64,
//!     items: Vec<Item>,
//! }
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Item {
//!     sku: String,
//!     qty: i64,
//! }
//! impl Event for OrderPlaced {
//!     const TYPE: &'static str = "order.placed";
//! }
//!
//! #[derive(Serialize)]
//! struct StockReserved {
//!     order_id: u64,
//! }
//! impl Event for StockReserved {
//!     const TYPE: &'static str = "stock.reserved";
//! }
//!
//! struct Inventory;
//!
//! impl Worker for Inventory {
//!     type Event = OrderPlaced;
//!
//!     fn subscription(&self) -> Subscription {
//!         Subscription::new("orders.inventory")
//!             .bind("order.placed")
//!             .prefetch(50)
//!             .concurrency(10)
//!             .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(5))
//!     }
//!
//!     async fn handle(&self, order: Delivery<OrderPlaced>, ctx: &Context) -> Outcome {
//!         if order.items.iter().any(|i| i.qty <= 0) {
//!             return Err(Failure::reject("every item needs a positive quantity"));
//!         }
//!         // A follow-up event, correlated with this one.
//!         ctx.publish(&StockReserved { order_id: order.order_id }).await?;
//!         Ok(())
//!     }
//! }
//! ```
//!
//! ## Running workers
//!
//! ```no_run
//! # use rabbitry::prelude::*;
//! # struct Inventory;
//! # impl Worker for Inventory {
//! #     type Event = serde_json::Value;
//! #     fn subscription(&self) -> Subscription { Subscription::new("q").bind("#") }
//! #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
//! # }
//! #[tokio::main]
//! async fn main() -> rabbitry::Result<()> {
//!     Runtime::builder()
//!         .url("amqp://guest:guest@127.0.0.1:5672/%2f") // default: $AMQP_URL
//!         .worker(Inventory)
//!         .run_until_signal() // graceful shutdown on SIGINT / SIGTERM
//!         .await
//! }
//! ```
//!
//! [`RuntimeBuilder::start`] returns a [`Runtime`] handle instead, to add, remove, pause
//! and resume workers while it runs, to publish through its connection, and to shut down.
//! rabbitry logs through [`tracing`](https://docs.rs/tracing): install a subscriber (for
//! example `tracing_subscriber::fmt().init()`), or failures go unseen.
//!
//! ## Between the broker and the handler
//!
//! Each worker runs as a [tower](https://docs.rs/tower) service stack that takes a raw
//! [`Message`] (its [`Metadata`] and the body as received) and answers with a
//! [`Disposition`]: ack, skip, retry (after a delay) or dead-letter. Built-in layers add a
//! tracing span, turn panics into retries, refuse bodies that are not JSON or too large,
//! and time the handler out; your layers go around every worker
//! ([`RuntimeBuilder::layer`]) or one ([`Registration::layer`]). The [`middleware`] module
//! shows how to write one, from an async function or as a tower `Layer`.
//!
//! ```
//! use rabbitry::middleware::{self, Next};
//! use rabbitry::{Disposition, Message, Registration};
//! # use rabbitry::prelude::*;
//! # struct Inventory;
//! # impl Worker for Inventory {
//! #     type Event = serde_json::Value;
//! #     fn subscription(&self) -> Subscription { Subscription::new("q").bind("#") }
//! #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
//! # }
//!
//! // Messages from the staging environment are acknowledged without being handled.
//! let skip_staging = middleware::from_fn(|message: Message, next: Next| async move {
//!     if message.metadata().app_id() == Some("staging") {
//!         return Disposition::skip("published by staging");
//!     }
//!     next.run(message).await
//! });
//! let builder = Runtime::builder().worker(Registration::new(Inventory).layer(skip_staging));
//! # let _ = builder;
//! ```
//!
//! Every delivery received and settled, every message sent, every publish and every change
//! of a worker's state reaches the [`observe::Observer`]s given to
//! [`RuntimeBuilder::observer`]; the testing harness is one of them, and the
//! `rabbitry-observe` crate (Prometheus metrics, `/metrics` `/health` `/ready`, W3C trace
//! propagation) another. Each delivery runs in a `delivery` span and each publish in a
//! `publish` span, with the OpenTelemetry messaging attributes.
//!
//! ## The pipeline
//!
//! Ready-made layers in [`middleware`]: [`FilterLayer`](middleware::FilterLayer) (skip by
//! type, source or payload, with a declarative [`Condition`]),
//! [`TransformLayer`](middleware::TransformLayer) (rewrite the JSON),
//! [`UpcastLayer`](middleware::UpcastLayer) (old event versions up to the handler's),
//! `ValidateLayer` (JSON Schema, feature `schema`; `Schema`, `Schemas`, also checked
//! when publishing), [`DedupLayer`](middleware::DedupLayer) (skip what was handled),
//! [`RateLimitLayer`](middleware::RateLimitLayer) (a [`Rate`], by waiting) and
//! [`OrderedLayer`](middleware::OrderedLayer) (per-key order, also through retries).
//! Besides [`Worker`], three kinds of consumer: a [`Router`] (several event types on one
//! queue, a handler each), a [`BatchWorker`] (deliveries in batches, an outcome each) and a
//! [`ContentRouter`] (rules that send events on to other routing keys). An event type can
//! set its default priority ([`Event::PRIORITY`]).
//!
//! ```
//! use rabbitry::middleware::{DedupLayer, FilterLayer, RateLimitLayer};
//! use rabbitry::{Condition, Rate, Registration};
//! # use rabbitry::prelude::*;
//! # struct Inventory;
//! # impl Worker for Inventory {
//! #     type Event = serde_json::Value;
//! #     fn subscription(&self) -> Subscription { Subscription::new("q").bind("#") }
//! #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
//! # }
//! let inventory = Registration::new(Inventory)
//!     .layer(FilterLayer::new(Condition::field("/warehouse").equals("berlin")))
//!     .layer(DedupLayer::new())
//!     .layer(RateLimitLayer::new(Rate::per_second(200)?));
//! let builder = Runtime::builder().worker(inventory);
//! # let _ = builder;
//! # Ok::<(), rabbitry::Error>(())
//! ```
//!
//! ## Publishing
//!
//! [`Publisher::publish`] sends an event with routing key [`Event::TYPE`] and returns once
//! the broker has confirmed it. A message no queue is bound for is an
//! [`Error::Unroutable`], not a silent drop. [`Publisher::pipeline`] publishes a stream from
//! one task with many confirms in flight, and [`Publisher::publish_batch`] a slice.
//! [`Topology::declare`] prepares the queues of workers that have not started yet.
//!
//! ## On the broker
//!
//! For a worker on queue `q` and the exchange `events`, the runtime declares (see
//! [`Topology`], which prints the plan without connecting):
//!
//! | what | name |
//! |---|---|
//! | topic exchange | `events` |
//! | dead-letter exchange (direct) | `events.dlx` |
//! | worker queue, bound to the worker's patterns | `q` |
//! | one retry queue per delay, whose messages expire back into `q` only | `q.retry.<ms>` |
//! | dead-letter queue | `q.dlq` |
//! | what the worker declared last, to remove bindings and retry queues it drops | `q.topology` |
//!
//! A failed message is copied to the retry queue of its delay (or to the dead-letter
//! queue) with the failure headers in [`headers`], the copy is confirmed, and only then is
//! the original acknowledged. Delivery is therefore at least once: after a crash a message
//! can be handled twice, so handlers that must not repeat effects should key them on
//! [`Delivery::message_id`], which stays the same across retries.
//!
//! ## Testing your workers
//!
//! [`testing::TestBroker`] runs workers on [`MemoryBroker`], an in-process broker with
//! RabbitMQ's semantics, and reports what was handled, retried (with which delay),
//! dead-lettered (with which headers) and published. With tokio's time paused, retry
//! delays pass instantly. See the [`testing`] module for a complete, runnable example.
//! A [`MemoryBroker`]'s URL (`memory://<name>`) also works anywhere a RabbitMQ URL does.
//!
//! ## Bad input
//!
//! A body that is not JSON, does not fit the event type, is over the size limit, or has a
//! content type or encoding other than plain JSON is dead-lettered at once with the reason
//! in `x-exception-message`; the worker carries on with the next message.
//!
//! ## Errors
//!
//! Every [`Error`] says what to do in its `Display` form; print that, not the `Debug` form
//! that `main() -> Result<…>` shows:
//!
//! ```no_run
//! # use rabbitry::prelude::*;
//! use std::process::ExitCode;
//!
//! #[tokio::main]
//! async fn main() -> ExitCode {
//!     match Runtime::builder().run_until_signal().await {
//!         Ok(()) => ExitCode::SUCCESS,
//!         Err(e) => {
//!             eprintln!("error: {e}");
//!             ExitCode::FAILURE
//!         }
//!     }
//! }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

mod batch;
mod broker;
mod condition;
mod content_router;
mod context;
pub mod control;
mod disposition;
mod error;
mod event;
pub mod headers;
mod message;
pub mod middleware;
pub mod observe;
mod outcome;
mod publisher;
mod rate;
mod registration;
pub mod report;
mod retry;
mod router;
mod runtime;
mod saga;
mod schedule;
#[cfg(feature = "schema")]
mod schema;
pub mod testing;
mod topic;
mod topology;
mod worker;

pub use batch::{BatchLimits, BatchWorker};
pub use broker::{BrokerMessage, MemoryBroker, redact_url};
pub use condition::{Condition, FieldCondition, Test};
pub use content_router::{ContentRouter, ROUTED_BY, Rule};
pub use context::Context;
pub use disposition::Disposition;
pub use error::{BrokerError, Error, Result};
pub use event::{Delivery, Event};
/// The AMQP client rabbitry is built on, re-exported: the few of its types that appear in
/// rabbitry's API ([`lapin::BasicProperties`] in [`Metadata::properties`],
/// [`lapin::types::FieldTable`] in [`Metadata::headers`], [`lapin::Error`] inside
/// [`BrokerError`]) are the ones named here, so you need no `lapin` dependency of your own
/// and cannot pick a mismatched version. rabbitry's major version moves with lapin's.
pub use lapin;
pub use message::{Message, Metadata};
pub use outcome::{Failure, FailureKind, Outcome};
pub use publisher::{Outgoing, Pipeline, Publisher, PublisherBuilder};
pub use rate::Rate;
pub use registration::Registration;
pub use retry::RetryPolicy;
pub use router::{EventHandler, Router};
pub use runtime::{DEFAULT_URL, QueueDepth, Runtime, RuntimeBuilder, WeakRuntime, WorkerStatus};
pub use saga::{MemorySagaRepository, PendingMessage, Saga, SagaRecord, SagaRepository, Step};
pub use schedule::{Schedule, Scheduler, Tick};
#[cfg(feature = "schema")]
pub use schema::{Schema, Schemas, Violations};
pub use topology::Topology;
pub use topology::delay::{DELAY_PRECISION, MAX_DELAY};
pub use worker::{QueueType, Subscription, Worker};

/// The types most workers need: `use rabbitry::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Context, Delivery, Event, Failure, Outcome, Publisher, RetryPolicy, Runtime, Subscription,
        Worker,
    };
}

/// Lock `mutex`, also after a panic elsewhere poisoned it: rabbitry's locks guard plain
/// bookkeeping that stays consistent between statements.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string panic payload)")
}

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    #[test]
    fn panic_payloads_become_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(super::panic_message(&*p), "boom 1");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(super::panic_message(&*p), "(a non-string panic payload)");
    }
}
