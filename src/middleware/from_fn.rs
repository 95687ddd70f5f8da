//! A layer from an async function.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::util::BoxCloneService;
use tower_layer::Layer;
use tower_service::Service;

use crate::disposition::Disposition;
use crate::message::Message;

/// A layer made of an async function that gets each [`Message`] and [`Next`], the rest of
/// the stack: it can look at or rewrite the message, answer itself (skip, dead-letter) or
/// pass it on with [`Next::run`] and look at the answer.
///
/// ```
/// use rabbitry::middleware::{self, Next};
/// use rabbitry::{Disposition, Message};
///
/// // Skip whatever the legacy importer publishes; hand the rest on.
/// let layer = middleware::from_fn(|message: Message, next: Next| async move {
///     if message.metadata().app_id() == Some("legacy-importer") {
///         return Disposition::skip("published by the legacy importer");
///     }
///     next.run(message).await
/// });
/// # let _ = layer;
/// ```
///
/// Each message costs one boxed clone of the rest of the stack; a hand-written
/// [`Layer`](tower_layer::Layer) avoids it.
pub fn from_fn<F, Fut>(f: F) -> FromFnLayer<F>
where
    F: Fn(Message, Next) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Disposition> + Send + 'static,
{
    FromFnLayer { f }
}

/// The layer made by [`from_fn`].
#[derive(Clone)]
pub struct FromFnLayer<F> {
    f: F,
}

impl<F> fmt::Debug for FromFnLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFnLayer").finish_non_exhaustive()
    }
}

impl<S, F: Clone> Layer<S> for FromFnLayer<F> {
    type Service = FromFn<S, F>;

    fn layer(&self, inner: S) -> FromFn<S, F> {
        FromFn {
            inner,
            f: self.f.clone(),
        }
    }
}

/// The service of [`FromFnLayer`].
#[derive(Clone)]
pub struct FromFn<S, F> {
    inner: S,
    f: F,
}

impl<S, F> fmt::Debug for FromFn<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<S, F, Fut> Service<Message> for FromFn<S, F>
where
    S: Service<Message, Response = Disposition, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    F: Fn(Message, Next) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Disposition> + Send + 'static,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        // The service that was polled ready goes to `next`; a fresh clone stays for the
        // following message.
        let ready = super::take_ready(&mut self.inner);
        let next = Next {
            inner: BoxCloneService::new(ready),
        };
        let future = (self.f)(message, next);
        Box::pin(async move { Ok(future.await) })
    }
}

/// The rest of the stack, given to a [`from_fn`] layer.
pub struct Next {
    inner: BoxCloneService<Message, Disposition, Infallible>,
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next").finish_non_exhaustive()
    }
}

impl Next {
    /// Hand `message` to the rest of the stack and return its answer.
    pub async fn run(mut self, message: Message) -> Disposition {
        // Ready already: the layer's own poll_ready polled it.
        let Ok(disposition) = self.inner.call(message).await;
        disposition
    }
}
