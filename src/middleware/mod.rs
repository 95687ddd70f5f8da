//! Middleware: [tower] layers between the broker and the handler.
//!
//! Every worker runs as a tower [`Service`] that takes a [`Message`] (metadata and the body
//! as received) and answers with a [`Disposition`] (ack, skip, retry, dead-letter) — never
//! with an error, so each layer states what happens to the acknowledgement. The stack of
//! one worker, from the broker inwards:
//!
//! | layer | what it does |
//! |---|---|
//! | *(the runtime)* | a `delivery` span around everything below and the settlement (worker, event type, attempt, the OpenTelemetry messaging attributes, the outcome) |
//! | [`CatchPanicLayer`] | a panic below becomes a retry of kind `panic` |
//! | [`JsonBodyLayer`] | dead-letters bodies that are too large or not JSON (kind `undecodable`) |
//! | layers given to [`RuntimeBuilder::layer`](crate::RuntimeBuilder::layer) | every worker of the runtime |
//! | layers given to [`Registration::layer`](crate::Registration::layer) | this worker only |
//! | [`TimeoutLayer`] | the worker's handler timeout (kind `timeout`, retried) |
//! | decode | the body into the worker's event type: a [`Delivery`](crate::Delivery); dead-letters what does not fit (kind `undecodable`) |
//! | [`Worker::handle`](crate::Worker::handle) | its [`Outcome`](crate::Outcome) becomes the disposition |
//!
//! Layers listed first are outermost, as with tower's `ServiceBuilder`. The runtime takes
//! the next delivery only once the stack is ready (`poll_ready`), so a layer that is not
//! ready holds deliveries back in the broker, within the worker's prefetch.
//!
//! # Writing a layer
//!
//! The quickest way is an async function, with [`from_fn`]:
//!
//! ```
//! use rabbitry::middleware::{self, Next};
//! use rabbitry::{Disposition, Message, Registration};
//! # use rabbitry::prelude::*;
//! # struct Shipping;
//! # impl Worker for Shipping {
//! #     type Event = serde_json::Value;
//! #     fn subscription(&self) -> Subscription { Subscription::new("shipping").bind("order.placed") }
//! #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
//! # }
//!
//! // Only orders for the EU reach the handler; the others are acknowledged as skipped.
//! let eu_only = middleware::from_fn(|message: Message, next: Next| async move {
//!     match message.json::<serde_json::Value>() {
//!         Ok(order) if order["region"] == "eu" => next.run(message).await,
//!         _ => Disposition::skip("not an EU order"),
//!     }
//! });
//! let registration = Registration::new(Shipping).layer(eu_only);
//! # let _ = Runtime::builder().worker(registration);
//! ```
//!
//! A layer of its own type avoids the boxing `from_fn` does per message, and can hold
//! back intake in `poll_ready` (a rate limiter, a circuit breaker):
//!
//! ```
//! use std::convert::Infallible;
//! use std::task::{Context, Poll};
//!
//! use futures_util::future::{Either, Ready, ready};
//! use rabbitry::middleware::{Layer, Service};
//! use rabbitry::{Disposition, Message};
//!
//! /// Skips messages that carry the header `x-test: true`.
//! #[derive(Clone)]
//! struct SkipTestTrafficLayer;
//!
//! impl<S> Layer<S> for SkipTestTrafficLayer {
//!     type Service = SkipTestTraffic<S>;
//!     fn layer(&self, inner: S) -> Self::Service {
//!         SkipTestTraffic(inner)
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct SkipTestTraffic<S>(S);
//!
//! impl<S> Service<Message> for SkipTestTraffic<S>
//! where
//!     S: Service<Message, Response = Disposition, Error = Infallible>,
//! {
//!     type Response = Disposition;
//!     type Error = Infallible;
//!     type Future = Either<Ready<Result<Disposition, Infallible>>, S::Future>;
//!
//!     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
//!         self.0.poll_ready(cx)
//!     }
//!
//!     fn call(&mut self, message: Message) -> Self::Future {
//!         if message.metadata().header_str("x-test") == Some("true") {
//!             return Either::Left(ready(Ok(Disposition::skip("test traffic"))));
//!         }
//!         Either::Right(self.0.call(message))
//!     }
//! }
//! ```
//!
//! A layer that only decides on the spot, like this one, can skip the service: implement
//! [`Check`] (answer for the message, or let it go on) and return [`Checked`] from
//! `Layer::layer`; the filter, transform, upcast and validate layers are built that way.
//!
//! tower's own `ServiceBuilder` composes such layers (it is a layer itself). tower's
//! stock `RateLimit`, `Filter`, `Retry` and `Buffer` speak HTTP, not messages: they reject
//! with errors (which would retry a message that should be skipped) or retry inside the
//! process (holding a prefetch slot): rabbitry's own layers replace them.
//!
//! [tower]: https://docs.rs/tower

mod catch_panic;
mod check;
mod dedup;
mod filter;
mod from_fn;
mod json_body;
mod ordered;
mod rate_limit;
mod timeout;
mod transform;
mod upcast;
#[cfg(feature = "schema")]
mod validate;

use std::convert::Infallible;

pub use catch_panic::{CatchPanic, CatchPanicFuture, CatchPanicLayer};
pub use check::{Check, Checked};
pub use dedup::{ClaimHeld, Dedup, DedupLayer, DedupStore, IDEMPOTENCY_KEY, MemoryDedup};
pub(crate) use filter::payload_of;
pub use filter::{Filter, FilterLayer};
pub use from_fn::{FromFn, FromFnLayer, Next, from_fn};
pub use json_body::{JsonBody, JsonBodyLayer};
pub use ordered::{OrderKey, Ordered, OrderedLayer};
pub use rate_limit::{RateLimit, RateLimitLayer};
pub use timeout::{Timeout, TimeoutFuture, TimeoutLayer};
/// tower's `Layer`, re-exported (tower-layer 0.3).
pub use tower_layer::Layer;
/// tower's `Service`, re-exported (tower-service 0.3).
pub use tower_service::Service;
pub use transform::{REDACTED, Transform, TransformLayer};
pub(crate) use upcast::supported_version;
pub use upcast::{Upcast, UpcastLayer};
#[cfg(feature = "schema")]
pub use validate::{Validate, ValidateLayer};

use crate::disposition::Disposition;
use crate::message::Message;

/// Take the service that `poll_ready` made ready, and leave a clone in its place for the
/// next call: what a layer does whose future calls the inner service later.
pub(crate) fn take_ready<S: Clone>(service: &mut S) -> S {
    let fresh = service.clone();
    std::mem::replace(service, fresh)
}

/// A worker's whole stack, boxed: what runtime-wide layers wrap, and what a
/// [`Registration`](crate::Registration)'s layers wrap.
pub type WorkerService = tower::util::BoxCloneService<Message, Disposition, Infallible>;

/// What [`RuntimeBuilder::layer`](crate::RuntimeBuilder::layer) and
/// [`Registration::layer`](crate::Registration::layer) take: any tower [`Layer`] over a
/// worker's stack whose service answers a [`Message`] with a [`Disposition`] and is `Clone`
/// and `Send` (each consumer gets a clone). Implemented for every such layer; there is
/// nothing to implement by hand.
pub trait WorkerLayer: Send + Sync + 'static {
    /// Wrap `inner` and box the result.
    fn wrap(&self, inner: WorkerService) -> WorkerService;
}

impl<L> WorkerLayer for L
where
    L: Layer<WorkerService> + Send + Sync + 'static,
    L::Service:
        Service<Message, Response = Disposition, Error = Infallible> + Clone + Send + 'static,
    <L::Service as Service<Message>>::Future: Send + 'static,
{
    fn wrap(&self, inner: WorkerService) -> WorkerService {
        WorkerService::new(self.layer(inner))
    }
}
