//! An in-process broker with RabbitMQ's semantics for everything rabbitry uses: topic,
//! direct, fanout and default exchanges; durable queues and bindings; per-consumer prefetch
//! and unacknowledged tracking; ack, nack and reject with requeue; priorities; queue
//! time-to-live and dead-lettering (so retry tiers and dead-letter queues work unchanged);
//! mandatory returns; redelivery of what a closed channel left unacknowledged. Time is
//! tokio's, so a test with paused time runs a retry schedule instantly.

mod queue;
mod seam;
mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use lapin::BasicProperties;
use tokio::sync::Notify;

pub(crate) use self::seam::{Channel, Connection};
pub(crate) use self::state::LEASE_ARG;
use self::state::{Message, State};
use crate::error::{Error, Result};

const SCHEME: &str = "memory://";

/// Whether `url` names an in-memory broker (`memory://<name>`).
pub(super) fn is_memory_url(url: &str) -> bool {
    url.starts_with(SCHEME)
}

/// In-memory brokers by name. Weak: a broker lives while a handle or connection holds it.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Broker>>>> = LazyLock::new(Mutex::default);

pub(crate) struct Broker {
    name: String,
    /// Wall time and tokio time when the broker was made: the clock its schedules read
    /// (so that every process of a test shares one, paused or not).
    epoch: (std::time::SystemTime, tokio::time::Instant),
    state: Mutex<State>,
    changed: Notify,
}

impl Broker {
    /// The broker called `name`, created if it does not exist.
    fn named(name: &str) -> Arc<Broker> {
        let mut registry = crate::lock(&REGISTRY);
        if let Some(broker) = registry.get(name).and_then(Weak::upgrade) {
            return broker;
        }
        registry.retain(|_, b| b.strong_count() > 0);
        let broker = Arc::new(Broker {
            name: name.to_owned(),
            epoch: (std::time::SystemTime::now(), tokio::time::Instant::now()),
            state: Mutex::default(),
            changed: Notify::new(),
        });
        registry.insert(name.to_owned(), Arc::downgrade(&broker));
        broker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Run `op` on the state, then start expiry timers it asked for and wake the waiters.
    fn with<T>(self: &Arc<Self>, op: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.lock();
        let result = op(&mut state);
        let expiring = std::mem::take(&mut state.needs_expiry);
        let claimed: Vec<String> = expiring
            .into_iter()
            .filter(|q| state.claim_expiry(q))
            .collect();
        drop(state);
        for queue in claimed {
            self.expire_later(queue);
        }
        self.changed.notify_waiters();
        result
    }

    /// A timer that dead-letters the messages of `queue` as their time-to-live runs out.
    fn expire_later(self: &Arc<Self>, queue: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime, expiry happens lazily, whenever the queue is next touched;
            // a later publish from inside a runtime starts the timer.
            let mut state = self.lock();
            state.expire_due(&queue);
            state.release_expiry(&queue);
            return;
        };
        let broker = Arc::downgrade(self);
        runtime.spawn(async move {
            // Expire under `with`, which also wakes whoever waits for a change (`idle`).
            let expire = |broker: &Weak<Broker>| {
                broker
                    .upgrade()
                    .and_then(|b| b.with(|s| s.expire_due(&queue)))
            };
            let mut next = expire(&broker);
            while let Some(at) = next {
                tokio::time::sleep_until(at).await;
                next = expire(&broker);
            }
        });
    }
}

/// The epoch of the in-memory broker at `url` (see [`Broker::epoch`]).
pub(crate) fn epoch(url: &str) -> (std::time::SystemTime, tokio::time::Instant) {
    let name = url.strip_prefix(SCHEME).unwrap_or(url);
    let name = name.split(['?', '/']).next().unwrap_or_default();
    Broker::named(name).epoch
}

/// A message as a queue holds it, for inspecting an in-memory broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BrokerMessage {
    /// The exchange it was published (or dead-lettered) to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties and headers.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether it was delivered before without being acknowledged.
    pub redelivered: bool,
}

impl From<Message> for BrokerMessage {
    fn from(m: Message) -> Self {
        BrokerMessage {
            exchange: m.exchange,
            routing_key: m.routing_key,
            properties: m.properties,
            body: m.body,
            redelivered: m.redelivered,
        }
    }
}

/// An in-process broker with RabbitMQ's semantics, for tests and for running without a
/// RabbitMQ. Anything that takes a broker URL takes [`url`](MemoryBroker::url).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> rabbitry::Result<()> {
/// use rabbitry::{MemoryBroker, Publisher};
///
/// let broker = MemoryBroker::new();
/// let publisher = Publisher::connect(&broker.url()).await?;
/// # Ok(()) }
/// ```
///
/// It keeps RabbitMQ's semantics for what rabbitry relies on (routing, prefetch,
/// acknowledgements, requeues, priorities, time-to-live, dead-lettering, mandatory returns,
/// redelivery) but not its durability: everything lives in this process's memory.
#[derive(Clone)]
pub struct MemoryBroker {
    broker: Arc<Broker>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("url", &self.url())
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A new, empty broker with a name of its own.
    pub fn new() -> MemoryBroker {
        MemoryBroker::named(&uuid::Uuid::now_v7().simple().to_string())
    }

    /// The broker called `name` in this process (`memory://<name>`), created if needed.
    pub fn named(name: &str) -> MemoryBroker {
        MemoryBroker {
            broker: Broker::named(name),
        }
    }

    /// The URL that connects to this broker: `memory://<name>`.
    pub fn url(&self) -> String {
        format!("{SCHEME}{}", self.broker.name)
    }

    /// The names of all queues, sorted.
    pub fn queues(&self) -> Vec<String> {
        self.broker.lock().queue_names()
    }

    /// Messages ready in `queue` (not counting unacknowledged ones); `None` if it does not
    /// exist.
    pub fn ready(&self, queue: &str) -> Option<usize> {
        self.broker.with(|s| s.ready(queue))
    }

    /// The ready messages of `queue`, in the order they would be delivered, left in place.
    pub fn messages(&self, queue: &str) -> Vec<BrokerMessage> {
        self.broker
            .with(|s| s.peek(queue).into_iter().map(Into::into).collect())
    }

    /// Remove and return up to `max` ready messages of `queue`, in delivery order.
    pub fn take(&self, queue: &str, max: usize) -> Vec<BrokerMessage> {
        self.broker
            .with(|s| s.take(queue, max).into_iter().map(Into::into).collect())
    }

    /// Delete `queue` with its messages and bindings, as an operator would; its consumers
    /// are cancelled. Returns how many messages it held, or `None` if it did not exist.
    pub fn delete_queue(&self, queue: &str) -> Option<usize> {
        self.broker.with(|s| s.remove_queue(queue))
    }

    /// Whether `queue` is bound to `exchange` with exactly `key`.
    pub fn is_bound(&self, queue: &str, exchange: &str, key: &str) -> bool {
        self.broker.lock().is_bound(queue, exchange, key)
    }

    /// Publish raw bytes as a bare AMQP client would (no confirm, not mandatory). Returns how
    /// many queues received it (0: unroutable, dropped).
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl AsRef<[u8]>,
        properties: BasicProperties,
    ) -> Result<usize> {
        let delivered = self.broker.with(|s| {
            s.has_exchange(exchange)
                .then(|| s.deliver(exchange, routing_key, body.as_ref(), properties))
        });
        delivered.ok_or_else(|| Error::ExchangeNotFound {
            exchange: exchange.to_owned(),
        })
    }

    /// Fail every connection, as if the network had dropped: consumers end with an error,
    /// unacknowledged deliveries go back to their queues, and runtimes reconnect.
    pub fn break_connections(&self) {
        self.broker.with(State::break_connections);
    }

    /// Start keeping every message clients publish, for [`published`](MemoryBroker::published).
    pub fn record_published(&self) {
        self.broker.with(|s| {
            s.journal.get_or_insert_with(Vec::new);
        });
    }

    /// Every message published by clients since [`record_published`](MemoryBroker::record_published).
    pub fn published(&self) -> Vec<BrokerMessage> {
        let state = self.broker.lock();
        state
            .journal
            .iter()
            .flatten()
            .cloned()
            .map(Into::into)
            .collect()
    }

    /// Wait until nothing is left to do: no delivery awaits an acknowledgement, no queue
    /// with a consumer holds a ready message, and no retry waits out its delay. With tokio's
    /// time paused, waiting lets time jump to the next retry.
    pub async fn idle(&self) {
        loop {
            let changed = self.broker.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.broker.lock().idle() {
                return;
            }
            changed.await;
        }
    }
}
