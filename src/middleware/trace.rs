//! A tracing span around every delivery.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::disposition::Disposition;
use crate::message::Message;

/// Runs the rest of the stack inside an `info`-level span named `delivery`, with the
/// worker, event type, message id and attempt as fields, so every log line a layer or a
/// handler writes says which message it is about. Built in: the outermost layer of every
/// worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S> Service<Message> for Trace<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let meta = message.metadata();
        let span = tracing::info_span!(
            "delivery",
            worker = %meta.queue(),
            event_type = %meta.event_type(),
            message_id = %meta.message_id(),
            attempt = meta.attempt(),
        );
        let future = span.in_scope(|| self.inner.call(message));
        future.instrument(span)
    }
}
