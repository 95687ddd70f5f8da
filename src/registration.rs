//! A worker as the runtime runs it: its subscription and its service stack.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use serde::de::DeserializeOwned;
use tower::util::BoxCloneService;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::Context;
use crate::disposition::Disposition;
use crate::event::Delivery;
use crate::message::Message;
use crate::middleware::{CatchPanicLayer, JsonBodyLayer, TimeoutLayer, WorkerLayer, WorkerService};
use crate::outcome::FailureKind;
use crate::publisher::Publisher;
use crate::worker::{Subscription, Worker};

/// A layer in boxed form: applied to any worker's boxed stack.
pub(crate) type BoxLayer = Arc<dyn WorkerLayer>;

/// What the runtime lends a worker's stack when it builds it.
pub(crate) struct Parts<'a> {
    pub(crate) publisher: &'a Publisher,
    pub(crate) max_body: usize,
    /// The runtime's layers, outermost first.
    pub(crate) layers: &'a [BoxLayer],
}

type Build = Box<dyn FnOnce(&Publisher) -> WorkerService + Send>;

/// A worker with the layers of its own stack, ready to register with
/// [`RuntimeBuilder::worker`](crate::RuntimeBuilder::worker) or
/// [`Runtime::add_worker`](crate::Runtime::add_worker). A plain [`Worker`] converts into
/// one, so most code never names this type.
///
/// ```
/// use rabbitry::middleware::{self, Next};
/// use rabbitry::{Disposition, Message, Registration};
/// # use rabbitry::prelude::*;
/// # struct Audit;
/// # impl Worker for Audit {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("audit").bind("#") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// let log_skips = middleware::from_fn(|message: Message, next: Next| async move {
///     let disposition = next.run(message).await;
///     if let Disposition::Skip { reason } = &disposition {
///         tracing::debug!(%reason, "skipped");
///     }
///     disposition
/// });
/// let audit = Registration::new(Audit).layer(log_skips);
/// # let _ = Runtime::builder().worker(audit);
/// ```
#[must_use = "a registration does nothing until it is given to RuntimeBuilder::worker or Runtime::add_worker"]
pub struct Registration {
    pub(crate) subscription: Subscription,
    pub(crate) handler: &'static str,
    /// The worker's own layers, outermost first.
    layers: Vec<BoxLayer>,
    build: Build,
    /// A configuration mistake found while building it, reported on registration.
    problem: Option<String>,
    /// Takes any body: no built-in JSON check ([`Registration::service`]).
    raw: bool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("worker", &self.subscription.queue())
            .field("handler", &self.handler)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl Registration {
    /// `worker` with no layers of its own (the runtime's and the built-in ones still apply).
    pub fn new<W: Worker>(worker: W) -> Registration {
        let subscription = worker.subscription();
        let worker = Arc::new(worker);
        Registration::innermost(subscription, std::any::type_name::<W>(), move |publisher| {
            Handler {
                worker,
                publisher: publisher.clone(),
            }
        })
    }

    /// A worker made of any tower service over raw [`Message`]s, for messages that have no
    /// event type of their own: an audit log, a bridge to another system, a keeper of dead
    /// letters. The service sees every body as received — the built-in check that a body
    /// is JSON of bounded size is skipped (the broker's own frame limit still applies) —
    /// inside the subscription's handler timeout and a panic guard; its
    /// [`Disposition`] settles the message as any worker's does.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use rabbitry::{Disposition, Message, Registration, Subscription};
    ///
    /// let count = tower::service_fn(|message: Message| async move {
    ///     println!("{} bytes on {}", message.body().len(), message.metadata().routing_key());
    ///     Ok::<_, Infallible>(Disposition::Ack)
    /// });
    /// let tap = Registration::service(Subscription::new("tap").bind("#"), count);
    /// # let _ = tap;
    /// ```
    pub fn service<S>(subscription: Subscription, service: S) -> Registration
    where
        S: Service<Message, Response = Disposition, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let mut registration = Registration::innermost(subscription, "service", move |_| service);
        registration.raw = true;
        registration
    }

    /// A registration whose innermost service (made from the runtime's publisher) is
    /// `make`'s, inside the subscription's handler timeout and a panic guard of its own (so
    /// that a handler's panic reaches the worker's layers as a retry, not an unwinding).
    pub(crate) fn innermost<S, F>(
        subscription: Subscription,
        handler: &'static str,
        make: F,
    ) -> Registration
    where
        F: FnOnce(&Publisher) -> S + Send + 'static,
        S: Service<Message, Response = Disposition, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let timeout = subscription.timeout;
        Registration::from_build(subscription, handler, move |publisher| {
            let service = CatchPanicLayer.layer(make(publisher));
            match timeout {
                Some(limit) => BoxCloneService::new(TimeoutLayer::new(limit).layer(service)),
                None => BoxCloneService::new(service),
            }
        })
    }

    /// A registration whose whole inner stack `build` makes (timeouts included).
    pub(crate) fn from_build<F>(
        subscription: Subscription,
        handler: &'static str,
        build: F,
    ) -> Registration
    where
        F: FnOnce(&Publisher) -> WorkerService + Send + 'static,
    {
        Registration {
            subscription,
            handler,
            layers: Vec::new(),
            build: Box::new(build),
            problem: None,
            raw: false,
        }
    }

    /// Report `problem` (a configuration mistake) when this is registered.
    pub(crate) fn problem(mut self, problem: Option<String>) -> Registration {
        self.problem = problem;
        self
    }

    /// Check the subscription and anything else that was set up.
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        self.subscription.validate()?;
        match &self.problem {
            Some(problem) => Err(crate::Error::Config(format!(
                "worker '{}': {problem}",
                self.subscription.queue()
            ))),
            None => Ok(()),
        }
    }

    /// Wrap this worker's handler in `layer`. The first layer added is the outermost, as
    /// with tower's `ServiceBuilder`; all of them sit inside the runtime's layers and
    /// outside the handler timeout.
    pub fn layer(mut self, layer: impl WorkerLayer) -> Registration {
        self.layers.push(Arc::new(layer));
        self
    }

    /// The worker's subscription.
    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    /// Build the whole stack, from the handler outwards.
    pub(crate) fn into_service(self, parts: &Parts<'_>) -> WorkerService {
        let mut service = (self.build)(parts.publisher);
        for layer in self.layers.iter().rev().chain(parts.layers.iter().rev()) {
            service = layer.wrap(service);
        }
        let guarded = tower::ServiceBuilder::new().layer(CatchPanicLayer);
        match self.raw {
            true => BoxCloneService::new(guarded.service(service)),
            false => {
                let checked = guarded.layer(JsonBodyLayer::new(parts.max_body));
                BoxCloneService::new(checked.service(service))
            }
        }
    }
}

impl<W: Worker> From<W> for Registration {
    fn from(worker: W) -> Registration {
        Registration::new(worker)
    }
}

/// `message`'s body decoded as `T` (named `type_name` in the reason), or its dead-letter
/// (kind `undecodable`).
pub(crate) fn decode<T: DeserializeOwned>(
    message: Message,
    type_name: &str,
) -> Result<Delivery<T>, Disposition> {
    let (metadata, body) = message.into_parts();
    match serde_json::from_slice::<T>(&body) {
        Ok(event) => Ok(Delivery::new(event, metadata, body)),
        Err(e) => Err(Disposition::dead_letter(
            FailureKind::Undecodable,
            format!("cannot decode the body as {type_name}: {e}"),
        )),
    }
}

/// The innermost service: decodes the body into the worker's event type and runs the
/// handler.
struct Handler<W> {
    worker: Arc<W>,
    publisher: Publisher,
}

impl<W> Clone for Handler<W> {
    fn clone(&self) -> Self {
        Handler {
            worker: self.worker.clone(),
            publisher: self.publisher.clone(),
        }
    }
}

impl<W: Worker> Service<Message> for Handler<W> {
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let worker = self.worker.clone();
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let delivery = match decode::<W::Event>(message, std::any::type_name::<W::Event>()) {
                Ok(delivery) => delivery,
                Err(dead_letter) => return Ok(dead_letter),
            };
            let ctx = Context::new(publisher, delivery.metadata_arc());
            Ok(worker.handle(delivery, &ctx).await.into())
        })
    }
}
