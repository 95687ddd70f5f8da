//! One queue, several event types: a handler per type.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use tower_service::Service;

use crate::context::Context;
use crate::disposition::Disposition;
use crate::event::{Delivery, Event};
use crate::message::Message;
use crate::middleware::supported_version;
use crate::outcome::{FailureKind, Outcome};
use crate::publisher::Publisher;
use crate::registration::{Registration, decode};
use crate::worker::Subscription;

type Route = Arc<dyn Fn(Message, Context) -> BoxFuture<'static, Disposition> + Send + Sync>;

/// A worker for several event types on one queue, dispatched on the event type (the AMQP
/// `type` property, or the routing key when it is absent), axum-style: a handler per type,
/// each an async function of the typed [`Delivery`] and the [`Context`].
///
/// ```
/// use rabbitry::prelude::*;
/// use rabbitry::Router;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct PaymentFailed { order_id: u64, reason: String }
/// impl Event for PaymentFailed { const TYPE: &'static str = "payment.failed"; }
///
/// async fn placed(order: Delivery<OrderPlaced>, _ctx: Context) -> Outcome {
///     println!("order {} placed", order.order_id);
///     Ok(())
/// }
///
/// let orders = Router::new(Subscription::new("order-status"))
///     .on::<OrderPlaced>(placed)
///     .on(|failed: Delivery<PaymentFailed>, _ctx: Context| async move {
///         println!("order {} not paid: {}", failed.order_id, failed.reason);
///         Ok(())
///     });
/// let runtime = Runtime::builder().worker(orders);
/// ```
///
/// With no bindings of its own, the subscription is bound to each routed type. A message
/// of a type no handler takes is dead-lettered (kind `unknown_type`, the reason names the
/// type and the known ones), or skipped after [`skip_unknown`](Router::skip_unknown). A
/// message newer than its handler's `E::VERSION` is dead-lettered (kind
/// `unsupported_version`). Layers go on the registration, as for any worker:
/// `Registration::from(router).layer(…)`.
#[must_use = "a router does nothing until it is registered with RuntimeBuilder::worker or Runtime::add_worker"]
pub struct Router {
    subscription: Subscription,
    routes: HashMap<&'static str, Route>,
    skip_unknown: bool,
    problem: Option<String>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("Router")
            .field("queue", &self.subscription.queue())
            .field("types", &types)
            .field("skip_unknown", &self.skip_unknown)
            .finish()
    }
}

impl Router {
    /// A router consuming `subscription`'s queue.
    pub fn new(subscription: Subscription) -> Router {
        Router {
            subscription,
            routes: HashMap::new(),
            skip_unknown: false,
            problem: None,
        }
    }

    /// Handle events of type `E::TYPE` with `handler`: `router.on::<OrderPlaced>(placed)`,
    /// or `router.on(placed)` when the handler's argument names the type.
    pub fn on<E>(mut self, handler: impl EventHandler<E>) -> Router
    where
        E: Event + DeserializeOwned + Send + 'static,
    {
        let handler = Arc::new(handler);
        let route: Route = Arc::new(move |message: Message, ctx: Context| {
            let handler = handler.clone();
            Box::pin(async move {
                if let Err(reason) = supported_version(message.metadata(), E::TYPE, E::VERSION) {
                    return Disposition::dead_letter(FailureKind::UnsupportedVersion, reason);
                }
                match decode::<E>(message, E::TYPE) {
                    Ok(delivery) => handler.handle(delivery, ctx).await.into(),
                    Err(dead_letter) => dead_letter,
                }
            })
        });
        if self.routes.insert(E::TYPE, route).is_some() {
            self.problem = Some(format!("two handlers for event type '{}'", E::TYPE));
        }
        self
    }

    /// Skip (acknowledge, recorded as skipped) a message of a type no handler takes,
    /// instead of dead-lettering it.
    pub fn skip_unknown(mut self) -> Router {
        self.skip_unknown = true;
        self
    }
}

/// A handler of one event type in a [`Router`]: any async function (or closure) of the
/// typed [`Delivery`] and the [`Context`] returning an [`Outcome`]. Implemented for every
/// such function; there is nothing to implement by hand.
pub trait EventHandler<E>: Send + Sync + 'static {
    /// What the handler returns.
    type Future: Future<Output = Outcome> + Send + 'static;

    /// Handle one delivery.
    fn handle(&self, delivery: Delivery<E>, ctx: Context) -> Self::Future;
}

impl<E, H, F> EventHandler<E> for H
where
    H: Fn(Delivery<E>, Context) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    type Future = F;

    fn handle(&self, delivery: Delivery<E>, ctx: Context) -> F {
        self(delivery, ctx)
    }
}

impl From<Router> for Registration {
    fn from(router: Router) -> Registration {
        let Router {
            mut subscription,
            routes,
            skip_unknown,
            mut problem,
        } = router;
        let mut types: Vec<&'static str> = routes.keys().copied().collect();
        types.sort_unstable();
        if routes.is_empty() {
            problem.get_or_insert_with(|| "the router has no handlers: add one with .on(…)".into());
        }
        if subscription.bindings().is_empty() && !subscription.existing {
            for t in &types {
                subscription = subscription.bind(*t);
            }
        }
        let known: Arc<str> = types.join(", ").into();
        let routes = Arc::new(routes);
        Registration::innermost(subscription, "rabbitry::Router", move |publisher| {
            Dispatch {
                routes,
                known,
                skip_unknown,
                publisher: publisher.clone(),
            }
        })
        .problem(problem)
    }
}

/// The innermost service of a router.
#[derive(Clone)]
struct Dispatch {
    routes: Arc<HashMap<&'static str, Route>>,
    known: Arc<str>,
    skip_unknown: bool,
    publisher: Publisher,
}

impl Service<Message> for Dispatch {
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let event_type = message.metadata().event_type();
        let Some(route) = self.routes.get(event_type).cloned() else {
            let reason = format!(
                "no handler for event type '{event_type}' (this router handles: {})",
                self.known
            );
            let disposition = match self.skip_unknown {
                true => Disposition::skip(reason),
                false => Disposition::dead_letter(FailureKind::UnknownType, reason),
            };
            return Box::pin(async move { Ok(disposition) });
        };
        let (metadata, body) = message.into_parts();
        let ctx = Context::new(self.publisher.clone(), metadata.clone());
        let message = Message::new(metadata, body);
        Box::pin(async move { Ok(route(message, ctx).await) })
    }
}
