//! Shared helpers for the integration tests.
//!
//! Every test works in its own namespace (a unique exchange and queue prefix) and deletes
//! what it declared when its `TestEnv` is dropped, so tests run in parallel. Tests written
//! as `async fn name(env: TestEnv)` and listed in `on_both_brokers!` run twice: against
//! RabbitMQ (`rabbitmq::name`) and against the in-memory broker (`in_memory::name`).
#![allow(dead_code)]

pub mod cleanup;
pub mod http;
pub mod journal;
pub mod relay;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rabbitry::prelude::*;
use rabbitry::{MemoryBroker, RuntimeBuilder, Topology};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// Instantiate each listed `async fn name(env: TestEnv)` as a test on each broker.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::TestEnv::rabbitmq(stringify!($name))).await
                }
            )*
        }
        mod in_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::TestEnv::in_memory(stringify!($name))).await
                }
            )*
        }
    };
}

/// How long a test waits for something that should happen before failing. Generous: it
/// bounds a failure, it is not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Check `check` every 50 ms until it holds (something that happens elsewhere: a store a
/// keeper writes, a process); fails the test after [`PATIENCE`].
pub async fn until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let wait = async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the expected state was reached in time");
}

/// The RabbitMQ URL.
pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.to_owned())
}

enum Backend {
    RabbitMq {
        relay: Mutex<Option<Arc<relay::Relay>>>,
    },
    Memory(MemoryBroker),
}

/// A message taken from a queue, from either broker.
#[derive(Debug, Clone)]
pub struct Taken {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub redelivered: bool,
}

impl Taken {
    /// A header as a string, whatever string type carried it.
    pub fn header_str(&self, key: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// A header as an integer, whatever integer type carried it.
    pub fn header_int(&self, key: &str) -> Option<i64> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongLongInt(v) => Some(*v),
            AMQPValue::LongInt(v) => Some((*v).into()),
            AMQPValue::ShortInt(v) => Some((*v).into()),
            AMQPValue::ShortShortUInt(v) => Some((*v).into()),
            _ => None,
        }
    }

    pub fn message_id(&self) -> Option<String> {
        self.properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
    }
}

/// A test's own exchange and queue names on one broker, deleted on drop.
pub struct TestEnv {
    pub exchange: String,
    prefix: String,
    queues: Mutex<BTreeSet<String>>,
    /// Whether the test published delayed messages (the delay tiers then need deleting).
    delays: std::sync::atomic::AtomicBool,
    backend: Backend,
}

impl TestEnv {
    fn with(test: &str, backend: Backend) -> TestEnv {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("t.{test}.{}", &id[id.len() - 8..]);
        TestEnv {
            exchange: format!("{prefix}.events"),
            prefix,
            queues: Mutex::new(BTreeSet::new()),
            delays: std::sync::atomic::AtomicBool::new(false),
            backend,
        }
    }

    /// On RabbitMQ.
    pub fn rabbitmq(test: &str) -> TestEnv {
        TestEnv::with(
            test,
            Backend::RabbitMq {
                relay: Mutex::new(None),
            },
        )
    }

    /// On a fresh in-memory broker.
    pub fn in_memory(test: &str) -> TestEnv {
        TestEnv::with(test, Backend::Memory(MemoryBroker::new()))
    }

    /// The in-memory broker, when this test runs on one.
    pub fn memory(&self) -> Option<&MemoryBroker> {
        match &self.backend {
            Backend::Memory(broker) => Some(broker),
            Backend::RabbitMq { .. } => None,
        }
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        match &self.backend {
            Backend::RabbitMq { .. } => url(),
            Backend::Memory(broker) => broker.url(),
        }
    }

    /// A queue name in this test's namespace.
    pub fn queue(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// A runtime builder on this test's exchange, with short grace and reconnect delays.
    pub fn builder(&self) -> RuntimeBuilder {
        Runtime::builder()
            .url(self.url())
            .exchange(self.exchange.clone())
            .shutdown_grace(Duration::from_secs(10))
            .startup_timeout(Duration::from_secs(10))
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// A runtime builder whose connections `break_connections` can break: on RabbitMQ it
    /// goes through a TCP relay (heartbeat 2 s).
    pub async fn breakable_builder(&self) -> RuntimeBuilder {
        match &self.backend {
            Backend::RabbitMq { relay } => {
                let r = Arc::new(relay::Relay::start("127.0.0.1:5672").await);
                let url = r.url_with("?heartbeat=2");
                *relay.lock().unwrap() = Some(r);
                self.builder().url(url)
            }
            Backend::Memory(_) => self.builder(),
        }
    }

    /// Break every connection of a `breakable_builder` runtime, as a network failure would.
    pub fn break_connections(&self) {
        match &self.backend {
            Backend::RabbitMq { relay } => relay
                .lock()
                .unwrap()
                .as_ref()
                .expect("a breakable builder")
                .cut(),
            Backend::Memory(broker) => broker.break_connections(),
        }
    }

    /// The relay of a `breakable_builder` runtime on RabbitMQ (`None` in memory).
    pub fn relay(&self) -> Option<Arc<relay::Relay>> {
        match &self.backend {
            Backend::RabbitMq { relay } => relay.lock().unwrap().clone(),
            Backend::Memory(_) => None,
        }
    }

    /// Delete the delay tiers of this test's exchange at the end (a test that publishes
    /// delayed messages calls this).
    pub fn uses_delays(&self) {
        self.delays
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Remember every queue `subscription` makes, for cleanup.
    pub fn track(&self, subscription: &Subscription) {
        self.track_names(Topology::new(&self.exchange, [subscription]).queues());
    }

    pub fn track_names<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut queues = self.queues.lock().unwrap();
        queues.extend(names.into_iter().map(str::to_owned));
    }

    /// A probe worker on `subscription` (tracked for cleanup) and its recorder.
    pub fn probe(
        &self,
        subscription: Subscription,
        behavior: impl Fn(&Seen) -> Outcome + Send + Sync + 'static,
    ) -> (Probe, Recorder) {
        self.track(&subscription);
        let (tx, rx) = mpsc::unbounded_channel();
        let probe = Probe {
            subscription,
            behavior: Arc::new(behavior),
            seen: tx,
            gate: None,
        };
        (probe, Recorder { rx })
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher::builder(self.url())
            .exchange(self.exchange.clone())
            .connect()
            .await
            .expect("publisher connects")
    }

    /// A bare lapin channel in confirm mode (RabbitMQ only).
    async fn bare(&self) -> (Connection, lapin::Channel) {
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("bare client connects");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        (conn, ch)
    }

    /// Publish raw bytes as a bare client of another language would.
    pub async fn publish_bare(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.publish_raw(&self.exchange, routing_key, body, props)
            .await;
    }

    /// Publish as a bare client to `exchange`; returns how many queues got the message.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> usize {
        if let Some(broker) = self.memory() {
            return broker
                .publish(exchange, routing_key, body, props)
                .expect("the exchange exists");
        }
        let (conn, ch) = self.bare().await;
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = ch
            .basic_publish(exchange.into(), routing_key.into(), mandatory, body, props)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "broker refused a bare publish");
        let routed = usize::from(confirm.take_message().is_none());
        let _ = conn.close(200, "OK".into()).await;
        routed
    }

    /// Messages ready in `queue` (not counting unacknowledged ones).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.passive(queue)
            .await
            .unwrap_or_else(|| panic!("{queue} exists"))
    }

    /// Messages ready in `queue`, or `None` if it does not exist.
    pub async fn ready_or_none(&self, queue: &str) -> Option<u32> {
        self.passive(queue).await
    }

    /// Messages ready in `queue`, or `None` if it does not exist.
    async fn passive(&self, queue: &str) -> Option<u32> {
        if let Some(broker) = self.memory() {
            return broker.ready(queue).map(|n| n as u32);
        }
        let (conn, ch) = self.bare().await;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "OK".into()).await;
        q.ok().map(|q| q.message_count())
    }

    /// Wait until `queue` holds exactly `n` ready messages.
    pub async fn wait_until_ready(&self, queue: &str, n: u32) {
        let wait = async {
            loop {
                if self.ready(queue).await == n {
                    return;
                }
                // RabbitMQ announces no change of a queue's count: ask again shortly.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("{queue} never held {n} ready messages"));
    }

    /// Whether `queue` exists.
    pub async fn exists(&self, queue: &str) -> bool {
        self.passive(queue).await.is_some()
    }

    /// Publish `body` straight into `queue` (through the default exchange).
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8]) {
        let props = BasicProperties::default().with_delivery_mode(2);
        let routed = self.publish_raw("", queue, body, props).await;
        assert_eq!(routed, 1, "{queue} exists");
    }

    /// Take the next `n` messages from `queue` (waiting for them), acknowledged.
    pub async fn take(&self, queue: &str, n: usize) -> Vec<Taken> {
        if let Some(broker) = self.memory() {
            // Once the broker is idle, everything that will reach `queue` is there.
            tokio::time::timeout(PATIENCE, broker.idle())
                .await
                .expect("the broker settles");
            let taken: Vec<Taken> = broker
                .take(queue, n)
                .into_iter()
                .map(|m| Taken {
                    body: m.body,
                    properties: m.properties,
                    redelivered: m.redelivered,
                })
                .collect();
            assert_eq!(
                taken.len(),
                n,
                "{queue} holds {} messages, not {n}",
                taken.len()
            );
            return taken;
        }
        let (conn, ch) = self.bare().await;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let d = tokio::time::timeout(PATIENCE, consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "waited {PATIENCE:?} for message {} in {queue}",
                        out.len() + 1
                    )
                })
                .expect("consumer open")
                .unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            out.push(Taken {
                body: d.data,
                properties: d.properties,
                redelivered: d.redelivered,
            });
        }
        let _ = conn.close(200, "OK".into()).await;
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.memory().is_some() {
            return; // the in-memory broker goes with the test
        }
        let mut queues: Vec<String> = self.queues.lock().unwrap().iter().cloned().collect();
        let mut exchanges = vec![self.exchange.clone(), format!("{}.dlx", self.exchange)];
        if self.delays.load(std::sync::atomic::Ordering::Relaxed) {
            queues.extend(Topology::delay_queues(&self.exchange));
            exchanges.extend(Topology::delay_tiers(&self.exchange));
        }
        cleanup::delete(&url(), queues, exchanges);
    }
}

/// What a probe saw of one delivery.
#[derive(Debug, Clone)]
pub struct Seen {
    pub message_id: String,
    pub attempt: u32,
    pub at: Instant,
    pub exchange: String,
    pub routing_key: String,
    pub event_type: String,
    pub body: Value,
    pub redelivered: bool,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub event_version: Option<u32>,
}

impl Seen {
    /// The `order_id` of an order event's body.
    pub fn order_id(&self) -> u64 {
        self.body["order_id"]
            .as_u64()
            .expect("an order_id in the body")
    }
}

type Behavior = Arc<dyn Fn(&Seen) -> Outcome + Send + Sync>;

/// A worker that takes any JSON, records each delivery, and answers as told.
pub struct Probe {
    subscription: Subscription,
    behavior: Behavior,
    seen: mpsc::UnboundedSender<Seen>,
    gate: Option<Arc<Semaphore>>,
}

impl Probe {
    /// Make every handler run wait for a permit of `gate` after recording its delivery
    /// and before answering.
    pub fn gated(mut self, gate: Arc<Semaphore>) -> Probe {
        self.gate = Some(gate);
        self
    }
}

impl Worker for Probe {
    type Event = Value;

    fn subscription(&self) -> Subscription {
        self.subscription.clone()
    }

    async fn handle(&self, d: Delivery<Value>, _ctx: &Context) -> Outcome {
        let seen = Seen {
            message_id: d.message_id().to_owned(),
            attempt: d.attempt(),
            at: Instant::now(),
            exchange: d.exchange().to_owned(),
            routing_key: d.routing_key().to_owned(),
            event_type: d.event_type().to_owned(),
            body: d.payload().clone(),
            redelivered: d.redelivered(),
            priority: d.priority(),
            correlation_id: d.correlation_id().map(str::to_owned),
            event_version: d.event_version(),
        };
        // Record first, so that a behaviour that panics is still seen.
        let _ = self.seen.send(seen.clone());
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        (self.behavior)(&seen)
    }
}

/// The deliveries a probe saw, in order.
pub struct Recorder {
    rx: mpsc::UnboundedReceiver<Seen>,
}

impl Recorder {
    /// A delivery already seen and not yet taken, if any.
    pub fn try_next(&mut self) -> Option<Seen> {
        self.rx.try_recv().ok()
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no delivery within {PATIENCE:?}"))
            .expect("probe alive")
    }

    pub async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// The order ids of the next `n` deliveries, in delivery order.
    pub async fn order_ids(&mut self, n: usize) -> Vec<u64> {
        self.take(n).await.iter().map(Seen::order_id).collect()
    }

    /// Whatever arrived already, without waiting.
    pub fn drain(&mut self) -> Vec<Seen> {
        let mut out = Vec::new();
        while let Ok(s) = self.rx.try_recv() {
            out.push(s);
        }
        out
    }
}

/// A typed test event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OrderPlaced {
    pub order_id: u64,
    pub user_id: u64,
    pub total: f64,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    pub sku: String,
    pub qty: i64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
    const VERSION: u32 = 2;
}

pub fn order(order_id: u64) -> OrderPlaced {
    OrderPlaced {
        order_id,
        user_id: 42,
        total: 59.9,
        items: vec![Item {
            sku: "BOOK-1".into(),
            qty: 2,
        }],
    }
}
