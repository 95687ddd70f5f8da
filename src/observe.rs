//! One seam to watch a runtime: every delivery received and settled, every publish, every
//! change of a worker's or the connection's state — and the place to carry a trace context
//! from a publish to the deliveries it causes.
//!
//! An [`Observer`] registered with [`RuntimeBuilder::observer`](crate::RuntimeBuilder::observer)
//! (or [`PublisherBuilder::observer`](crate::PublisherBuilder::observer) for a standalone
//! publisher) is called inline, on the task that settled or published, so it must be quick:
//! count, record, or hand the event to a channel. A panicking observer is logged and
//! ignored; it never disturbs a delivery.
//!
//! The testing harness ([`TestBroker`](crate::testing::TestBroker)) is one such observer;
//! the `rabbitry-observe` crate's Prometheus metrics, readiness and W3C trace propagation
//! are others.
//!
//! ```
//! use rabbitry::observe::{Handling, Observer, Settled};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! #[derive(Default)]
//! struct DeadLetterCount(AtomicU64);
//!
//! impl Observer for DeadLetterCount {
//!     fn settled(&self, settled: &Settled<'_>) {
//!         if let Handling::DeadLettered { .. } = settled.handling {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::FieldTable;

use crate::error::Error;
use crate::message::Metadata;
use crate::outcome::{Failure, FailureKind};

/// Watches a runtime or a publisher. Every method has an empty default: implement the
/// ones you need. Calls are inline and must not block.
pub trait Observer: Send + Sync + 'static {
    /// A delivery was settled: acknowledged (handled or skipped), retried, dead-lettered,
    /// or given back to its queue.
    fn settled(&self, settled: &Settled<'_>) {
        let _ = settled;
    }

    /// A publish finished: confirmed by the broker, or not. Retry and dead-letter copies
    /// are publishes too (to the default exchange and the dead-letter exchange).
    fn published(&self, published: &Published<'_>) {
        let _ = published;
    }

    /// The runtime, its connection or one of its workers changed state.
    fn lifecycle(&self, event: &Lifecycle<'_>) {
        let _ = event;
    }

    /// A delivery is about to enter its worker's stack. Every delivery received is later
    /// [`settled`](Observer::settled) exactly once (an abandoned one as
    /// [`Handling::Requeued`]), so the two calls can count what is in flight.
    ///
    /// [`Received::span`] is the delivery's span, not yet entered: the place to make it the
    /// child of a trace context the message carries.
    fn received(&self, received: &Received<'_>) {
        let _ = received;
    }

    /// A message made by [`Publisher::message`](crate::Publisher::message) (or
    /// [`Context::publish`](crate::Context::publish)) is about to be sent: the place to
    /// write a trace context into its headers. Retry and dead-letter copies are not
    /// announced here: they keep the headers they were received with.
    fn sending(&self, sending: &mut Sending<'_>) {
        let _ = sending;
    }
}

impl<O: Observer + ?Sized> Observer for Arc<O> {
    fn settled(&self, settled: &Settled<'_>) {
        (**self).settled(settled);
    }

    fn published(&self, published: &Published<'_>) {
        (**self).published(published);
    }

    fn lifecycle(&self, event: &Lifecycle<'_>) {
        (**self).lifecycle(event);
    }

    fn received(&self, received: &Received<'_>) {
        (**self).received(received);
    }

    fn sending(&self, sending: &mut Sending<'_>) {
        (**self).sending(sending);
    }
}

/// A delivery entering its worker's stack, as an [`Observer`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Received<'a> {
    /// The worker (its queue).
    pub worker: &'a str,
    /// The message's metadata as received.
    pub metadata: &'a Metadata,
    /// The delivery's span (`delivery`, with the OpenTelemetry messaging attributes), which
    /// the stack, the handler and the settlement run in.
    pub span: &'a tracing::Span,
}

/// A message about to be published, as an [`Observer`] sees it: its headers can be added
/// to (a trace context, say).
#[derive(Debug)]
#[non_exhaustive]
pub struct Sending<'a> {
    /// The exchange.
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The message id.
    pub message_id: &'a str,
    /// The publish's span (`publish`), a child of the span current where the message was
    /// sent (a handler's `delivery` span for a follow-up event).
    pub span: &'a tracing::Span,
    pub(crate) headers: &'a mut FieldTable,
}

impl Sending<'_> {
    /// A string header already set on the message.
    pub fn header(&self, key: &str) -> Option<&str> {
        crate::headers::get_str(Some(self.headers), key)
    }

    /// Set a string header (replacing one the sender set under the same key). Keys longer
    /// than 255 bytes, which AMQP cannot carry, are ignored.
    pub fn set_header(&mut self, key: &str, value: &str) {
        if key.len() <= 255 {
            crate::headers::set(self.headers, key, crate::headers::string(value));
        }
    }
}

/// How the runtime settled one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handling {
    /// The handler succeeded; the message was acknowledged.
    Handled,
    /// A layer skipped it (acknowledged without handling).
    Skipped {
        /// The layer's reason.
        reason: String,
    },
    /// It failed; a copy waits `delay` in a retry tier, and the original was acknowledged.
    Retried {
        /// The retry tier's delay.
        delay: Duration,
    },
    /// A copy went to the worker's dead-letter queue, and the original was acknowledged.
    DeadLettered {
        /// The failure's kind (`x-exception-kind`).
        kind: FailureKind,
        /// The failure's message (`x-exception-message`, before truncation).
        reason: String,
    },
    /// The retry or dead-letter copy could not be stored; the message went back to its
    /// queue (after a pause) to be delivered again.
    Requeued,
    /// A layer held it back ([`Disposition::Defer`](crate::Disposition::Defer)): a copy waits
    /// `delay` in a delay queue and returns with the same attempt count, and the original
    /// was acknowledged.
    Deferred {
        /// The delay queue's delay.
        delay: Duration,
        /// The layer's reason.
        reason: String,
    },
}

impl Handling {
    /// A short name: `handled`, `skipped`, `retried`, `dead_lettered`, `requeued` or
    /// `deferred`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Handling::Handled => "handled",
            Handling::Skipped { .. } => "skipped",
            Handling::Retried { .. } => "retried",
            Handling::DeadLettered { .. } => "dead_lettered",
            Handling::Requeued => "requeued",
            Handling::Deferred { .. } => "deferred",
        }
    }
}

/// One settled delivery, as an [`Observer`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Settled<'a> {
    /// The worker (its queue).
    pub worker: &'a str,
    /// The message's metadata as received (message id, event type, attempt, headers…).
    pub metadata: &'a Metadata,
    /// How it was settled.
    pub handling: &'a Handling,
    /// The failure behind a retry, a dead-letter or a requeue, if any.
    pub failure: Option<&'a Failure>,
    /// Time spent in the worker's service stack (layers, decoding and handler).
    pub duration: Duration,
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker confirmed it.
    Confirmed,
    /// No queue was bound for its routing key (a mandatory message came back).
    Unroutable,
    /// The broker refused it (a negative confirm).
    Nacked,
    /// Anything else: no confirm in time, a lost connection, a missing exchange.
    Failed,
}

impl PublishOutcome {
    /// A short name: `confirmed`, `unroutable`, `nacked` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishOutcome::Confirmed => "confirmed",
            PublishOutcome::Unroutable => "unroutable",
            PublishOutcome::Nacked => "nacked",
            PublishOutcome::Failed => "failed",
        }
    }
}

/// One finished publish, as an [`Observer`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Published<'a> {
    /// The exchange (`""` for the default exchange, which retry copies go through).
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The message id.
    pub message_id: &'a str,
    /// How it ended.
    pub outcome: PublishOutcome,
    /// The error, unless it was confirmed.
    pub error: Option<&'a Error>,
}

/// A change in a runtime's state.
#[derive(Debug)]
#[non_exhaustive]
pub enum Lifecycle<'a> {
    /// The runtime connected, declared its workers' topology and started consuming.
    Started {
        /// The exchange its workers consume from and its publisher publishes to.
        exchange: &'a str,
    },
    /// The connection was lost; the runtime reconnects by itself.
    ConnectionLost {
        /// What happened.
        error: &'a str,
    },
    /// The runtime reconnected after losing its connection.
    Reconnected,
    /// A worker's consumer started (at start, when added or resumed, after a restart or a
    /// reconnection).
    Consuming {
        /// The worker.
        worker: &'a str,
    },
    /// A worker stopped consuming on request.
    Stopped {
        /// The worker.
        worker: &'a str,
        /// Why.
        reason: StopReason,
    },
    /// A worker's consumer ended or could not start; it is started again after `restart_in`.
    Failed {
        /// The worker.
        worker: &'a str,
        /// What went wrong.
        error: &'a str,
        /// When the next attempt is made (growing with each failure in a row).
        restart_in: Duration,
    },
    /// The runtime stopped: every consumer is stopped and every connection closed.
    ShutDown,
}

/// Why a worker stopped consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`Runtime::pause`](crate::Runtime::pause).
    Paused,
    /// [`Runtime::remove_worker`](crate::Runtime::remove_worker).
    Removed,
    /// The runtime is shutting down.
    Shutdown,
}

/// The observers of one runtime or publisher.
#[derive(Clone, Default)]
pub(crate) struct Observers(Arc<[Arc<dyn Observer>]>);

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} observer(s)", self.0.len())
    }
}

impl Observers {
    pub(crate) fn new(list: Vec<Arc<dyn Observer>>) -> Observers {
        Observers(list.into())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn each(&self, what: &str, mut call: impl FnMut(&dyn Observer)) {
        for observer in self.0.iter() {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| call(&**observer))) {
                tracing::error!(
                    panic = crate::panic_message(&*panic),
                    "an observer panicked in {what}; ignored"
                );
            }
        }
    }

    pub(crate) fn settled(&self, settled: &Settled<'_>) {
        self.each("settled", |o| o.settled(settled));
    }

    pub(crate) fn published(&self, published: &Published<'_>) {
        self.each("published", |o| o.published(published));
    }

    pub(crate) fn lifecycle(&self, event: &Lifecycle<'_>) {
        self.each("lifecycle", |o| o.lifecycle(event));
    }

    pub(crate) fn received(&self, received: &Received<'_>) {
        self.each("received", |o| o.received(received));
    }

    pub(crate) fn sending(&self, sending: &mut Sending<'_>) {
        self.each("sending", |o| o.sending(sending));
    }
}
