//! Workers that take their deliveries in batches.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, oneshot};
use tower_service::Service;
use tracing::error;

use crate::context::Context;
use crate::disposition::Disposition;
use crate::event::Delivery;
use crate::lock;
use crate::message::Message;
use crate::middleware::WorkerService;
use crate::outcome::{FailureKind, Outcome};
use crate::publisher::Publisher;
use crate::registration::{Registration, decode};
use crate::worker::Subscription;

/// How a [`BatchWorker`] batches: at most `size` deliveries, and no delivery waits more
/// than `wait` for the batch to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    size: usize,
    wait: Duration,
}

impl BatchLimits {
    /// Up to `size` deliveries (at least 1), or whatever arrived within `wait` of the
    /// first.
    pub fn new(size: usize, wait: Duration) -> BatchLimits {
        BatchLimits {
            size: size.max(1),
            wait,
        }
    }

    /// The largest batch.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The longest a delivery waits for its batch to fill.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

/// A worker that handles deliveries in batches — to write them to a database in one
/// statement, call a bulk API, aggregate — and still gives each message its own outcome.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::prelude::*;
/// use rabbitry::{BatchLimits, BatchWorker, Registration};
///
/// #[derive(serde::Deserialize)]
/// struct Reading { sensor: u32, value: f64 }
///
/// struct Archive;
///
/// impl BatchWorker for Archive {
///     type Event = Reading;
///
///     fn subscription(&self) -> Subscription {
///         Subscription::new("archive").bind("sensor.reading")
///     }
///
///     fn batch(&self) -> BatchLimits {
///         BatchLimits::new(500, Duration::from_millis(200))
///     }
///
///     async fn handle(&self, batch: Vec<Delivery<Reading>>, _ctx: &Context) -> Vec<Outcome> {
///         // one INSERT for the whole batch; here, reject impossible readings one by one
///         batch
///             .iter()
///             .map(|r| match r.value.is_finite() {
///                 true => Ok(()),
///                 false => Err(Failure::reject(format!("sensor {}: not a number", r.sensor))),
///             })
///             .collect()
///     }
/// }
///
/// let runtime = Runtime::builder().worker(Registration::batch(Archive));
/// ```
///
/// Each message still passes through the worker's layers one by one (a filter or a
/// validator drops a message before it joins a batch), and is decoded on its own (one that
/// does not decode is dead-lettered alone). Outcomes are matched to deliveries by
/// position: a handler that returns fewer outcomes than deliveries has the rest retried.
/// The subscription's timeout applies to the whole batch call. The worker's concurrency
/// and prefetch are raised to at least the batch size, so a batch can fill.
pub trait BatchWorker: Send + Sync + 'static {
    /// The event type of every delivery.
    type Event: DeserializeOwned + Send + 'static;

    /// The queue and bindings.
    fn subscription(&self) -> Subscription;

    /// How deliveries are batched (default: up to 100, waiting at most a second).
    fn batch(&self) -> BatchLimits {
        BatchLimits::new(100, Duration::from_secs(1))
    }

    /// Handle one batch; return one outcome per delivery, in the same order. `ctx` is the
    /// first delivery's (its follow-ups carry that delivery's correlation id).
    fn handle(
        &self,
        batch: Vec<Delivery<Self::Event>>,
        ctx: &Context,
    ) -> impl Future<Output = Vec<Outcome>> + Send;
}

impl Registration {
    /// Register a [`BatchWorker`].
    pub fn batch<W: BatchWorker>(worker: W) -> Registration {
        let limits = worker.batch();
        let mut subscription = worker.subscription();
        subscription.concurrency = subscription.concurrency.max(limits.size);
        let wanted = u16::try_from(subscription.concurrency).unwrap_or(u16::MAX);
        subscription.prefetch = subscription.prefetch.max(wanted);
        subscription.concurrency = subscription
            .concurrency
            .min(usize::from(subscription.prefetch));
        let timeout = subscription.timeout;
        let worker = Arc::new(worker);
        Registration::from_build(subscription, std::any::type_name::<W>(), move |publisher| {
            WorkerService::new(Collector {
                worker,
                publisher: publisher.clone(),
                limits,
                timeout,
                open: Arc::default(),
            })
        })
    }
}

type Item<E> = (Delivery<E>, oneshot::Sender<Disposition>);

/// The batch being filled, if any: shared by the clones of one worker's collector.
type Open<E> = Arc<Mutex<Option<Arc<Slot<E>>>>>;

/// A batch being filled.
struct Slot<E> {
    items: Mutex<Vec<Item<E>>>,
    full: Notify,
}

/// The innermost service of a batch worker: collects decoded deliveries into batches.
struct Collector<W: BatchWorker> {
    worker: Arc<W>,
    publisher: Publisher,
    limits: BatchLimits,
    timeout: Option<Duration>,
    open: Open<W::Event>,
}

impl<W: BatchWorker> Clone for Collector<W> {
    fn clone(&self) -> Self {
        Collector {
            worker: self.worker.clone(),
            publisher: self.publisher.clone(),
            limits: self.limits,
            timeout: self.timeout,
            open: self.open.clone(),
        }
    }
}

impl<W: BatchWorker> Collector<W> {
    /// Wait for the batch to fill or for the time to pass, then run it.
    async fn lead(self, guard: Closing<W::Event>) {
        tokio::select! {
            () = guard.slot.full.notified() => {}
            () = tokio::time::sleep(self.limits.wait) => {}
        }
        guard.close();
        let items = std::mem::take(&mut *lock(&guard.slot.items));
        let (deliveries, replies): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        let Some(first) = deliveries.first() else {
            return;
        };
        let ctx = Context::new(self.publisher.clone(), first.metadata_arc());
        let count = deliveries.len();
        let run = AssertUnwindSafe(self.worker.handle(deliveries, &ctx)).catch_unwind();
        let result = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
            None => Some(run.await),
        };
        let mut outcomes: Vec<Disposition> = match result {
            Some(Ok(outcomes)) => outcomes.into_iter().map(Disposition::from).collect(),
            Some(Err(_panic)) => {
                error!(size = count, "batch handler panicked; retrying the batch");
                (0..count)
                    .map(|_| {
                        Disposition::retry_as(FailureKind::Panic, "the batch handler panicked")
                    })
                    .collect()
            }
            None => (0..count)
                .map(|_| Disposition::retry_as(FailureKind::Timeout, "the batch handler timed out"))
                .collect(),
        };
        if outcomes.len() != count {
            error!(
                size = count,
                outcomes = outcomes.len(),
                "the batch handler returned a different number of outcomes than deliveries"
            );
        }
        outcomes.truncate(count);
        while outcomes.len() < count {
            outcomes.push(Disposition::retry(format!(
                "the batch handler returned outcomes for only {} of {count} deliveries",
                outcomes.len()
            )));
        }
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}

/// Closes a leader's batch to newcomers — also when the leader is dropped before it ran
/// (the runtime stopping, a lost connection): its deliveries are then answered with a
/// retry instead of waiting for a leader that is gone.
struct Closing<E> {
    open: Open<E>,
    slot: Arc<Slot<E>>,
}

impl<E> Closing<E> {
    fn close(&self) {
        let mut open = lock(&self.open);
        if open.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.slot)) {
            *open = None;
        }
    }
}

impl<E> Drop for Closing<E> {
    fn drop(&mut self) {
        self.close();
        lock(&self.slot.items).clear();
    }
}

impl<W: BatchWorker> Service<Message> for Collector<W> {
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let delivery = match decode::<W::Event>(message, std::any::type_name::<W::Event>()) {
            Ok(delivery) => delivery,
            Err(dead_letter) => return Box::pin(async move { Ok(dead_letter) }),
        };
        let (reply, outcome) = oneshot::channel();
        let item = (delivery, reply);
        let leads = {
            let mut open = lock(&self.open);
            match &*open {
                Some(slot) => {
                    let mut items = lock(&slot.items);
                    items.push(item);
                    if items.len() >= self.limits.size {
                        slot.full.notify_one();
                        drop(items);
                        *open = None;
                    }
                    None
                }
                None => {
                    let slot = Arc::new(Slot {
                        items: Mutex::new(vec![item]),
                        full: Notify::new(),
                    });
                    if self.limits.size == 1 {
                        slot.full.notify_one();
                    } else {
                        *open = Some(slot.clone());
                    }
                    Some(slot)
                }
            }
        };
        // Made now, not at the first poll: a leader dropped before it ran closes its batch.
        let leads = leads.map(|slot| Closing {
            open: self.open.clone(),
            slot,
        });
        let this = self.clone();
        Box::pin(async move {
            if let Some(guard) = leads {
                this.lead(guard).await;
            }
            // The batch was dropped (the runtime is stopping): try again later.
            Ok(outcome
                .await
                .unwrap_or_else(|_| Disposition::retry("the batch was cancelled before it ran")))
        })
    }
}
