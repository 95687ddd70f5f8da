//! Publishing a stream of messages with a window of confirms in flight.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::stream::FuturesUnordered;
use futures_util::task::noop_waker_ref;
use futures_util::{FutureExt, StreamExt};
use tracing::Instrument;

use super::{Inner, Outgoing, Prepared, Publisher, Slot};
use crate::error::{Error, Result};
use crate::event::Event;

/// A confirm on its way: the message's number in the pipeline, and how it ended.
type InFlight = Pin<Box<dyn Future<Output = (usize, Result<()>)> + Send>>;

/// Publishes one message after another without waiting for each confirm, keeping up to a
/// window of confirms in flight; made by [`Publisher::pipeline`].
///
/// [`send`](Pipeline::send) returns once the message is handed to the connection (waiting
/// only while the window is full); [`flush`](Pipeline::flush) waits for every outstanding
/// confirm and reports the messages that were not confirmed — unroutable, refused, timed
/// out, or lost with the connection — as [`Error::Batch`], numbered in the order they were
/// sent since the last flush. Errors known before sending (an event that does not
/// serialize, a body over the limit, a broker that cannot be reached) are returned by
/// `send` itself, and the message does not count.
///
/// One task with a pipeline publishes about as fast as the broker takes messages: unlike a
/// loop of [`Publisher::publish`] calls, it waits neither for each message to be written to
/// the socket nor for its confirm.
///
/// Messages of one pipeline go out on one channel, in order. Call `flush` before dropping
/// a pipeline: the outcome of confirms still in flight is otherwise never known.
#[must_use = "a pipeline's confirms are only checked by .flush().await"]
pub struct Pipeline<'p> {
    publisher: &'p Publisher,
    slot: usize,
    window: usize,
    in_flight: FuturesUnordered<InFlight>,
    sent: usize,
    failures: Vec<(usize, Error)>,
}

impl fmt::Debug for Pipeline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("window", &self.window)
            .field("in_flight", &self.in_flight.len())
            .field("sent", &self.sent)
            .field("failures", &self.failures.len())
            .finish()
    }
}

impl<'p> Pipeline<'p> {
    pub(super) fn new(publisher: &'p Publisher, window: usize) -> Pipeline<'p> {
        Pipeline {
            publisher,
            slot: publisher.inner.pick(),
            window,
            in_flight: FuturesUnordered::new(),
            sent: 0,
            failures: Vec::new(),
        }
    }

    /// Keep at most `window` confirms in flight (default 1000; at least 1).
    pub fn window(mut self, window: usize) -> Pipeline<'p> {
        self.window = window.max(1);
        self
    }

    /// Publish `event` with routing key `E::TYPE`; returns its message id once it is on its
    /// way. Its confirm is checked by [`flush`](Pipeline::flush).
    pub async fn send<E: Event>(&mut self, event: &E) -> Result<String> {
        self.send_message(self.publisher.message(event)).await
    }

    /// Publish a message made with [`Publisher::message`] (its own routing key, priority,
    /// headers…); returns its message id once it is on its way.
    pub async fn send_message<E: Event>(&mut self, message: Outgoing<'_, E>) -> Result<String> {
        let mut prepared = message.prepare()?;
        while self.in_flight.len() >= self.window {
            if let Some(done) = self.in_flight.next().await {
                self.record(done);
            }
        }
        let inner = self.publisher.inner.clone();
        inner.pace().await;
        self.publisher.route_delayed(&mut prepared).await?;
        let slot = match inner.slot(self.slot).await {
            Ok(slot) => slot,
            Err(e) => {
                let (exchange, key) = (&inner.exchange, &prepared.routing_key);
                inner.observe(exchange, key, &prepared.id, Err(&e));
                return Err(e);
            }
        };
        let id = prepared.id.clone();
        let number = self.sent;
        self.sent += 1;
        let span = inner.announce(&mut prepared);
        let mut publish: InFlight = Box::pin(
            publish_one(inner, slot, prepared)
                .instrument(span)
                .map(move |result| (number, result)),
        );
        // The first poll hands the frames to the connection, here and in order; the
        // connection writing them and the broker's confirm are awaited in the background, so
        // one task keeps many messages in flight.
        let mut cx = TaskContext::from_waker(noop_waker_ref());
        match publish.as_mut().poll(&mut cx) {
            Poll::Ready(done) => self.record(done),
            Poll::Pending => self.in_flight.push(publish),
        }
        // Collect what has been confirmed meanwhile, so failures do not wait for flush.
        while let Some(Some(done)) = self.in_flight.next().now_or_never() {
            self.record(done);
        }
        Ok(id)
    }

    fn record(&mut self, (number, result): (usize, Result<()>)) {
        if let Err(e) = result {
            self.failures.push((number, e));
        }
    }

    /// Confirms still outstanding.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Wait for every outstanding confirm. Returns how many messages were sent since the
    /// last flush when all of them were confirmed; otherwise [`Error::Batch`] with the
    /// number (in sending order since the last flush) and error of each one that was not.
    /// The pipeline can be used again afterwards.
    pub async fn flush(&mut self) -> Result<usize> {
        while let Some(done) = self.in_flight.next().await {
            self.record(done);
        }
        let total = std::mem::take(&mut self.sent);
        let mut failures = std::mem::take(&mut self.failures);
        if failures.is_empty() {
            return Ok(total);
        }
        failures.sort_by_key(|(number, _)| *number);
        Err(Error::Batch { total, failures })
    }
}

/// Publish one message on `slot` and wait for its confirm (within the publish timeout).
async fn publish_one(inner: Arc<Inner>, slot: Arc<Slot>, message: Prepared) -> Result<()> {
    let Prepared {
        due: _,
        via,
        routing_key,
        body,
        properties,
        id,
        mandatory,
    } = message;
    let exchange = via.as_deref().unwrap_or(&inner.exchange);
    let confirmed = async {
        let confirm = slot
            .channel
            .publish(exchange, &routing_key, &body, properties, mandatory)
            .await
            .map_err(|e| inner.publish_error(exchange, &routing_key, e))?;
        inner.settle(exchange, &routing_key, &id, confirm).await
    };
    let result = tokio::time::timeout(inner.timeout, confirmed)
        .await
        .unwrap_or_else(|_| Err(inner.timeout_error(exchange, &routing_key)));
    inner.observe(exchange, &routing_key, &id, result.as_ref().map(drop));
    result
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        if !self.in_flight.is_empty() {
            tracing::warn!(
                unconfirmed = self.in_flight.len(),
                "a publisher pipeline was dropped before flush(): whether its last messages were stored is unknown"
            );
        }
    }
}
