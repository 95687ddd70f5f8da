//! The handler timeout.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::disposition::Disposition;
use crate::message::Message;
use crate::outcome::FailureKind;

/// Gives up on the services below it after a time limit: the message is retried like a
/// transient failure, with kind [`FailureKind::Timeout`]. Dropping the future cancels the
/// handler at its next `.await`; effects it already had stay (handlers must be idempotent).
///
/// Built in, innermost: around decoding and the handler, set by
/// [`Subscription::timeout`](crate::Subscription::timeout), so time a layer above spends
/// waiting (a rate limiter) does not count.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// Time out after `limit`.
    pub fn new(limit: Duration) -> TimeoutLayer {
        TimeoutLayer { limit }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Message> for Timeout<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        TimeoutFuture {
            inner: tokio::time::timeout(self.limit, self.inner.call(message)),
            limit: self.limit,
        }
    }
}

pin_project! {
    /// The future of [`Timeout`].
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        limit: Duration,
    }
}

impl<F: Future<Output = Result<Disposition, Infallible>>> Future for TimeoutFuture<F> {
    type Output = Result<Disposition, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Ready(Ok(done)) => Poll::Ready(done),
            Poll::Ready(Err(_elapsed)) => Poll::Ready(Ok(Disposition::retry_as(
                FailureKind::Timeout,
                format!("handler did not finish within {:?}", this.limit),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}
