//! An in-process broker with RabbitMQ's semantics for everything rabbitry uses: topic,
//! direct, fanout and default exchanges; durable queues and bindings; per-consumer prefetch
//! and unacknowledged tracking; ack, nack and reject with requeue; priorities; queue
//! time-to-live and dead-lettering (so retry tiers and dead-letter queues work unchanged);
//! mandatory returns; redelivery of what a closed channel left unacknowledged. Time is
//! tokio's, so a test with paused time runs a retry schedule instantly.

mod state;
mod topic;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use futures_util::Stream;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use tokio::sync::{Notify, mpsc, watch};

use self::state::{Delivery, Message, State};
use super::{Confirm, Incoming};
use crate::error::{BrokerError, Error, Result};

const SCHEME: &str = "memory://";

/// Whether `url` names an in-memory broker (`memory://<name>`).
pub(super) fn is_memory_url(url: &str) -> bool {
    url.starts_with(SCHEME)
}

/// In-memory brokers by name. Weak: a broker lives while a handle or connection holds it.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Broker>>>> = LazyLock::new(Mutex::default);

pub(crate) struct Broker {
    name: String,
    state: Mutex<State>,
    changed: Notify,
}

impl Broker {
    /// The broker called `name`, created if it does not exist.
    fn named(name: &str) -> Arc<Broker> {
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(broker) = registry.get(name).and_then(Weak::upgrade) {
            return broker;
        }
        registry.retain(|_, b| b.strong_count() > 0);
        let broker = Arc::new(Broker {
            name: name.to_owned(),
            state: Mutex::default(),
            changed: Notify::new(),
        });
        registry.insert(name.to_owned(), Arc::downgrade(&broker));
        broker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
            // Outside a runtime, expiry happens lazily, whenever the queue is next touched.
            self.lock().expire_due(&queue);
            return;
        };
        let broker = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let next = match broker.upgrade() {
                    Some(b) => b.lock().expire_due(&queue),
                    None => return,
                };
                let Some(next) = next else {
                    return;
                };
                tokio::time::sleep_until(next).await;
                match broker.upgrade() {
                    // Expire under `with`, which also wakes whoever waits for a change.
                    Some(b) => b.with(|_| ()),
                    None => return,
                }
            }
        });
    }
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

// ---------------------------------------------------------------- the seam's side

struct ConnHandle {
    broker: Arc<Broker>,
    id: u64,
    lost: watch::Receiver<Option<lapin::Error>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let id = self.id;
        self.broker.with(|s| s.close_connection(id, None));
    }
}

/// A connection to an in-memory broker; closed when its last clone (and channel) is dropped.
#[derive(Clone)]
pub(crate) struct Connection {
    inner: Arc<ConnHandle>,
}

impl Connection {
    pub(crate) fn open(url: &str) -> Result<Connection> {
        let name = url.strip_prefix(SCHEME).unwrap_or(url);
        let name = name.split(['?', '/']).next().unwrap_or_default();
        if name.is_empty() {
            return Err(Error::Config(format!(
                "'{url}' names no in-memory broker: use memory://<name> (see MemoryBroker::url)"
            )));
        }
        let broker = Broker::named(name);
        let (id, lost) = broker.with(State::connect);
        Ok(Connection {
            inner: Arc::new(ConnHandle { broker, id, lost }),
        })
    }

    pub(crate) fn channel(&self) -> lapin::Result<Channel> {
        let id = self.inner.broker.with(|s| s.open_channel(self.inner.id))?;
        Ok(Channel {
            inner: Arc::new(ChanHandle {
                conn: self.inner.clone(),
                id,
            }),
        })
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.inner.broker.lock().is_connected(self.inner.id)
    }

    pub(crate) fn lost(&self) -> impl std::future::Future<Output = BrokerError> + Send + 'static {
        let mut lost = self.inner.lost.clone();
        async move {
            loop {
                if let Some(e) = lost.borrow_and_update().clone() {
                    return BrokerError::from(e);
                }
                if lost.changed().await.is_err() {
                    let closed =
                        lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed);
                    return BrokerError::from(lapin::Error::from(closed));
                }
            }
        }
    }

    pub(crate) fn close(&self) {
        let id = self.inner.id;
        self.inner.broker.with(|s| s.close_connection(id, None));
    }
}

struct ChanHandle {
    conn: Arc<ConnHandle>,
    id: u64,
}

impl Drop for ChanHandle {
    fn drop(&mut self) {
        let id = self.id;
        self.conn.broker.with(|s| s.close_channel(id, None));
    }
}

/// A channel on an in-memory connection; closed when its last clone is dropped.
#[derive(Clone)]
pub(crate) struct Channel {
    inner: Arc<ChanHandle>,
}

impl Channel {
    fn with<T>(&self, op: impl FnOnce(&mut State, u64) -> T) -> T {
        let id = self.inner.id;
        self.inner.conn.broker.with(|s| op(s, id))
    }

    pub(crate) fn is_open(&self) -> bool {
        self.with(|s, id| s.is_open(id))
    }

    pub(crate) fn declare_exchange(&self, name: &str, kind: &str) -> lapin::Result<()> {
        self.with(|s, id| s.declare_exchange(id, name, kind))
    }

    pub(crate) fn declare_queue(&self, name: &str, args: FieldTable) -> lapin::Result<u32> {
        self.with(|s, id| s.declare_queue(id, name, args))
    }

    pub(crate) fn delete_queue(&self, name: &str) -> lapin::Result<u32> {
        self.with(|s, id| s.delete_queue(id, name))
    }

    pub(crate) fn bind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        self.with(|s, id| s.bind(id, queue, exchange, key))
    }

    pub(crate) fn qos(&self, prefetch: u16) -> lapin::Result<()> {
        self.with(|s, id| s.qos(id, prefetch))
    }

    pub(crate) fn confirm_select(&self) -> lapin::Result<()> {
        // Every publish is confirmed at once; there is no mode to switch on.
        if self.is_open() {
            Ok(())
        } else {
            Err(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "confirm.select",
            )
            .into())
        }
    }

    pub(crate) fn consume(&self, queue: &str, tag: &str) -> lapin::Result<Deliveries> {
        self.with(|s, id| s.consume(id, queue, tag)).map(Deliveries)
    }

    pub(crate) fn get_message_id(&self, queue: &str) -> lapin::Result<Option<String>> {
        self.with(|s, id| s.get_message_id(id, queue))
    }

    pub(crate) fn cancel(&self, tag: &str) -> lapin::Result<()> {
        self.with(|s, id| s.cancel(id, tag))
    }

    pub(crate) fn ack(&self, tag: u64, multiple: bool) -> lapin::Result<()> {
        self.with(|s, id| s.ack(id, tag, multiple))
    }

    pub(crate) fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<()> {
        self.with(|s, id| s.nack(id, tag, requeue))
    }

    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> lapin::Result<Confirm> {
        self.with(|s, id| s.publish(id, exchange, routing_key, body, properties, mandatory))
    }

    pub(crate) fn close(&self) {
        self.with(|s, id| s.close_channel(id, None));
    }
}

/// A consumer's deliveries; ends when the consumer is cancelled or its channel closes.
pub(crate) struct Deliveries(mpsc::UnboundedReceiver<Delivery>);

impl Stream for Deliveries {
    type Item = lapin::Result<Incoming>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use lapin::types::{AMQPValue, LongString};

    use super::*;
    use crate::broker::{NOT_FOUND, PRECONDITION_FAILED, reply_code};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn with_id(id: &str) -> BasicProperties {
        BasicProperties::default().with_message_id(id.into())
    }

    fn channel() -> (MemoryBroker, Channel) {
        let broker = MemoryBroker::new();
        let conn = Connection::open(&broker.url()).unwrap();
        let ch = conn.channel().unwrap();
        (broker, ch)
    }

    fn ids(messages: Vec<BrokerMessage>) -> Vec<String> {
        messages
            .into_iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn routes_by_topic_direct_fanout_and_default_exchange() {
        let (broker, ch) = channel();
        for (x, kind) in [("t", "topic"), ("d", "direct"), ("f", "fanout")] {
            ch.declare_exchange(x, kind).unwrap();
        }
        for q in ["q1", "q2", "q3"] {
            ch.declare_queue(q, FieldTable::default()).unwrap();
        }
        ch.bind("q1", "t", "order.#").unwrap();
        ch.bind("q2", "d", "order.placed").unwrap();
        ch.bind("q3", "f", "ignored").unwrap();
        for (x, key) in [
            ("t", "order.placed.eu"),
            ("d", "order.placed"),
            ("d", "order.shipped"),
            ("f", "x"),
            ("", "q3"),
        ] {
            ch.publish(x, key, b"{}", BasicProperties::default(), false)
                .unwrap();
        }
        assert_eq!(
            [broker.ready("q1"), broker.ready("q2"), broker.ready("q3")],
            [Some(1), Some(1), Some(2)]
        );
    }

    #[tokio::test]
    async fn prefetch_bounds_deliveries_and_a_multiple_ack_frees_them() {
        let (broker, ch) = channel();
        ch.declare_queue("q", FieldTable::default()).unwrap();
        for i in 0..5 {
            ch.publish("", "q", b"{}", with_id(&i.to_string()), false)
                .unwrap();
        }
        ch.qos(2).unwrap();
        let mut deliveries = ch.consume("q", "c").unwrap();
        let first = deliveries.next().await.unwrap().unwrap();
        let second = deliveries.next().await.unwrap().unwrap();
        assert_eq!((first.tag, second.tag), (1, 2));
        assert_eq!(
            broker.ready("q"),
            Some(3),
            "only the prefetch was delivered"
        );
        ch.ack(2, true).unwrap();
        assert_eq!(broker.ready("q"), Some(1));
        let err = ch.ack(99, false).unwrap_err();
        assert_eq!(reply_code(&err), Some(PRECONDITION_FAILED));
        assert!(
            !ch.is_open(),
            "an unknown delivery tag closes the channel, as on RabbitMQ"
        );
    }

    #[tokio::test]
    async fn a_closed_channel_gives_back_its_unacknowledged_deliveries_in_order() {
        let (broker, ch) = channel();
        ch.declare_queue("q", FieldTable::default()).unwrap();
        for id in ["a", "b", "c"] {
            ch.publish("", "q", b"{}", with_id(id), false).unwrap();
        }
        let consumer = ch.clone();
        let mut deliveries = consumer.consume("q", "c").unwrap();
        for _ in 0..3 {
            deliveries.next().await.unwrap().unwrap();
        }
        ch.nack(2, true).unwrap(); // "b" back first
        consumer.close();
        let back = broker.messages("q");
        assert_eq!(ids(back.clone()), ["a", "b", "c"]);
        assert!(back.iter().all(|m| m.redelivered));
        // The stream ends with its channel (after "b"'s redelivery, already in its buffer).
        let rest: Vec<_> = deliveries.collect().await;
        assert!(rest.len() <= 1, "{rest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_and_rejected_messages_are_dead_lettered_with_x_death() {
        let (broker, ch) = channel();
        ch.declare_exchange("dlx", "direct").unwrap();
        ch.declare_queue("dlq", FieldTable::default()).unwrap();
        ch.bind("dlq", "dlx", "work").unwrap();
        ch.declare_queue(
            "work",
            args(&[
                ("x-dead-letter-exchange", text("dlx")),
                ("x-dead-letter-routing-key", text("work")),
            ]),
        )
        .unwrap();
        let tier = args(&[
            ("x-message-ttl", AMQPValue::LongLongInt(1000)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work")),
        ]);
        ch.declare_queue("work.retry.1000", tier).unwrap();

        ch.publish("", "work.retry.1000", b"{}", with_id("r"), true)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(broker.ready("work"), Some(0));
        tokio::time::sleep(Duration::from_millis(1)).await;
        broker.idle().await;
        let moved = broker.messages("work");
        assert_eq!(
            ids(moved.clone()),
            ["r"],
            "expired back into the worker queue"
        );
        let Some(AMQPValue::FieldArray(deaths)) = moved[0]
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
        else {
            panic!("no x-death");
        };
        let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
            panic!()
        };
        assert_eq!(death.inner().get("reason"), Some(&text("expired")));
        assert_eq!(death.inner().get("queue"), Some(&text("work.retry.1000")));

        let mut deliveries = ch.consume("work", "c").unwrap();
        let d = deliveries.next().await.unwrap().unwrap();
        ch.nack(d.tag, false).unwrap();
        assert_eq!(
            ids(broker.messages("dlq")),
            ["r"],
            "rejected without requeue: dead-lettered"
        );
    }

    #[tokio::test]
    async fn higher_priorities_are_delivered_first() {
        let (broker, ch) = channel();
        ch.declare_queue("p", args(&[("x-max-priority", AMQPValue::LongLongInt(10))]))
            .unwrap();
        for (id, priority) in [("low", 1), ("none", 0), ("high", 9), ("over", 200)] {
            ch.publish("", "p", b"{}", with_id(id).with_priority(priority), false)
                .unwrap();
        }
        assert_eq!(ids(broker.messages("p")), ["over", "high", "low", "none"]);
    }

    #[tokio::test]
    async fn conflicts_missing_exchanges_and_unroutable_messages_answer_like_rabbitmq() {
        let (_broker, ch) = channel();
        ch.declare_queue("q", FieldTable::default()).unwrap();
        let err = ch
            .declare_queue("q", args(&[("x-max-priority", AMQPValue::LongLongInt(10))]))
            .unwrap_err();
        assert_eq!(reply_code(&err), Some(PRECONDITION_FAILED));
        assert!(
            err.to_string()
                .contains("inequivalent arg 'x-max-priority' for queue 'q'"),
            "{err}"
        );

        let (_broker, ch) = channel();
        let err = ch
            .publish("nowhere", "k", b"{}", BasicProperties::default(), true)
            .unwrap_err();
        assert_eq!(reply_code(&err), Some(NOT_FOUND));

        let (_broker, ch) = channel();
        ch.declare_exchange("t", "topic").unwrap();
        let confirm = ch
            .publish("t", "nobody", b"{}", with_id("m"), true)
            .unwrap();
        assert!(matches!(confirm, Confirm::Ack { returned: Some(Some(ref id)) } if id == "m"));
        let quorum = args(&[
            ("x-queue-type", text("quorum")),
            ("x-max-priority", AMQPValue::LongLongInt(5)),
        ]);
        let err = ch.declare_queue("qq", quorum).unwrap_err();
        assert!(
            err.to_string().contains("invalid arg 'x-max-priority'"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn broken_connections_end_consumers_with_an_error_and_are_noticed() {
        let broker = MemoryBroker::new();
        let conn = Connection::open(&broker.url()).unwrap();
        let ch = conn.channel().unwrap();
        ch.declare_queue("q", FieldTable::default()).unwrap();
        let mut deliveries = ch.consume("q", "c").unwrap();
        let lost = conn.lost();
        broker.break_connections();
        assert!(deliveries.next().await.unwrap().is_err());
        assert!(lost.await.to_string().contains("broken"));
        assert!(!conn.is_connected());
        assert!(
            Connection::open(&broker.url()).unwrap().channel().is_ok(),
            "a new connection works"
        );
    }
}
