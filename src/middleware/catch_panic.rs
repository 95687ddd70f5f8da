//! Panics become failures, never crashes.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::disposition::Disposition;
use crate::message::Message;
use crate::outcome::FailureKind;
use crate::panic_message;

/// Turns a panic anywhere below it — in a layer's `poll_ready` or `call`, in decoding, in
/// the handler — into a retry with kind [`FailureKind::Panic`] and the panic's message. The
/// worker keeps running. Built in, just inside the tracing span.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic {
            inner,
            poll_ready_panic: None,
        }
    }
}

/// The service of [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
    /// A panic in the inner `poll_ready`: the next message fails with it instead of
    /// reaching a service whose state is unknown.
    poll_ready_panic: Option<String>,
}

fn panicked(what: &str, message: &str) -> Disposition {
    Disposition::retry_as(FailureKind::Panic, format!("{what} panicked: {message}"))
}

impl<S> Service<Message> for CatchPanic<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.poll_ready_panic.is_some() {
            return Poll::Ready(Ok(()));
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.poll_ready(cx))) {
            Ok(ready) => ready,
            Err(panic) => {
                self.poll_ready_panic = Some(panic_message(&*panic).to_owned());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, message: Message) -> Self::Future {
        if let Some(panic) = self.poll_ready_panic.take() {
            let failed = panicked("a layer's poll_ready", &panic);
            return CatchPanicFuture::done(failed);
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(message))) {
            Ok(future) => CatchPanicFuture {
                state: State::Running {
                    inner: AssertUnwindSafe(future).catch_unwind(),
                },
            },
            Err(panic) => CatchPanicFuture::done(panicked("a layer", panic_message(&*panic))),
        }
    }
}

pin_project! {
    /// The future of [`CatchPanic`].
    #[derive(Debug)]
    pub struct CatchPanicFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = Projection]
    #[derive(Debug)]
    enum State<F> {
        // The inner future runs under the guard.
        Running { #[pin] inner: CatchUnwind<AssertUnwindSafe<F>> },
        // The inner service panicked before it returned a future.
        Done { disposition: Option<Disposition> },
    }
}

impl<F> CatchPanicFuture<F> {
    fn done(disposition: Disposition) -> Self {
        CatchPanicFuture {
            state: State::Done {
                disposition: Some(disposition),
            },
        }
    }
}

impl<F: Future<Output = Result<Disposition, Infallible>>> Future for CatchPanicFuture<F> {
    type Output = Result<Disposition, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Projection::Running { inner } => match inner.poll(cx) {
                Poll::Ready(Ok(done)) => Poll::Ready(done),
                Poll::Ready(Err(panic)) => {
                    Poll::Ready(Ok(panicked("handler", panic_message(&*panic))))
                }
                Poll::Pending => Poll::Pending,
            },
            Projection::Done { disposition } => Poll::Ready(Ok(disposition
                .take()
                .unwrap_or_else(|| panicked("a layer", "polled after completion")))),
        }
    }
}
