//! Hold intake back to a rate: the next delivery waits in the broker, nothing is refused.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::disposition::Disposition;
use crate::message::Message;
use crate::rate::{Limiter, Rate};

/// Limits a worker to a [`Rate`] by *waiting*: the stack is not ready (`poll_ready`) until
/// the next slot, so the runtime takes no delivery before then. Nothing is rejected,
/// retried or lost because of the limit; messages wait in the queue (up to the prefetch,
/// already delivered but not started). Keep the prefetch near the concurrency for a slow
/// rate, so few deliveries sit unacknowledged for long.
///
/// Each worker the layer wraps gets its own limit (given to
/// [`RuntimeBuilder::layer`](crate::RuntimeBuilder::layer), every worker is limited
/// separately). Across processes each process has its own: divide the rate by the number
/// of processes.
///
/// ```
/// use rabbitry::middleware::RateLimitLayer;
/// use rabbitry::{Rate, Registration};
/// # use rabbitry::prelude::*;
/// # struct Mailer;
/// # impl Worker for Mailer {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("mailer").bind("user.registered") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// // The mail provider allows 20 a second, bursts of 5.
/// let mailer = Registration::new(Mailer).layer(RateLimitLayer::new(Rate::per_second(20)?.burst(5)));
/// # let _ = Runtime::builder().worker(mailer);
/// # Ok::<(), rabbitry::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RateLimitLayer {
    rate: Rate,
}

impl RateLimitLayer {
    /// Limit each wrapped worker to `rate`.
    pub fn new(rate: Rate) -> RateLimitLayer {
        RateLimitLayer { rate }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: Arc::new(Limiter::new(self.rate)),
            wait: None,
            granted: false,
        }
    }
}

/// The service of [`RateLimitLayer`]. Its clones share the limit.
#[derive(Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
    wait: Option<Pin<Box<Sleep>>>,
    /// A slot was taken by `poll_ready` and not yet used by `call`.
    granted: bool,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            wait: None,
            granted: false,
        }
    }
}

impl<S> Service<Message> for RateLimit<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        while !self.granted {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            match self.limiter.acquire(Instant::now()) {
                Ok(()) => self.granted = true,
                Err(at) => self.wait = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> S::Future {
        self.granted = false;
        self.inner.call(message)
    }
}
