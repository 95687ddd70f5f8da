//! Publishing events with publisher confirms.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use tracing::Instrument;

use crate::broker::{self, Channel, Confirm, Connection, NOT_FOUND};
use crate::error::{BrokerError, Error, Result};
use crate::event::Event;
use crate::headers;
use crate::observe::{Observers, PublishOutcome, Published, Sending};

mod builder;
mod outgoing;
mod pipeline;
mod returns;

pub use builder::PublisherBuilder;
pub(crate) use outgoing::MessageOptions;
pub use outgoing::Outgoing;
use outgoing::Prepared;
pub use pipeline::Pipeline;
use returns::Returns;

/// Confirms a [`Pipeline`] keeps in flight by default.
const DEFAULT_WINDOW: usize = 1000;

/// Publishes events to a topic exchange and waits for the broker's confirm.
///
/// Every message is persistent and `mandatory`, and carries a UUID v7 message id, its event
/// type, a timestamp, `application/json` and its event version. A publish returns once the
/// broker has taken responsibility for the message; an unroutable message (no queue bound for
/// its type) is an [`Error::Unroutable`], not a silent drop.
///
/// `Publisher` is cheap to clone and safe to share: concurrent publishes pipeline on the same
/// channel, each waiting only for its own confirm. It keeps its own connections (a
/// `deadpool-lapin` pool, one confirm channel per connection) and reopens them when they fail.
///
/// ```no_run
/// # use rabbitry::{Event, Publisher};
/// # #[derive(serde::Serialize)] struct OrderPlaced { order_id: u64 }
/// # impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
/// # async fn run() -> rabbitry::Result<()> {
/// let publisher = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let id = publisher.publish(&OrderPlaced { order_id: 1001 }).await?;
/// publisher.message(&OrderPlaced { order_id: 1002 }).priority(9).send().await?;
/// # Ok(()) }
/// ```
///
/// Known limit: when a routable and an unroutable message on the same connection are
/// confirmed by the same multiple-acknowledgement, the AMQP client may hand the returned
/// message to the wrong confirm. rabbitry matches returns by message id, so a routable message
/// is never reported unroutable, but in that race an unroutable one can be reported as sent.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    pool: broker::Pool,
    slots: Vec<SlotCell>,
    next: AtomicUsize,
    exchange: String,
    timeout: Duration,
    max_body: usize,
    app_id: Option<ShortString>,
    returns: Returns,
    observers: Observers,
    limiter: Option<crate::rate::Limiter>,
    /// Set once this publisher has declared the delay tiers of its exchange.
    delays: tokio::sync::OnceCell<()>,
    #[cfg(feature = "schema")]
    schemas: Option<crate::schema::Schemas>,
}

/// One pooled connection and its confirm channel. Publishes take the live slot under a
/// read lock (one `Arc` clone); only reopening a dead one waits on the async mutex.
#[derive(Default)]
struct SlotCell {
    live: std::sync::RwLock<Option<Arc<Slot>>>,
    reopening: tokio::sync::Mutex<()>,
}

struct Slot {
    /// Keeps the pooled connection checked out for this slot.
    connection: Connection,
    channel: Channel,
}

impl SlotCell {
    fn open(&self) -> Option<Arc<Slot>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.as_ref().filter(|s| s.channel.is_open()).cloned()
    }

    fn set(&self, slot: Option<Arc<Slot>>) -> Option<Arc<Slot>> {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *live, slot)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &self.inner.url)
            .field("exchange", &self.inner.exchange)
            .field("connections", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher with default settings for the broker at `url`.
    pub async fn connect(url: &str) -> Result<Publisher> {
        Publisher::builder(url).connect().await
    }

    /// Configure a publisher for the broker at `url`.
    pub fn builder(url: impl Into<String>) -> PublisherBuilder {
        PublisherBuilder {
            url: url.into(),
            exchange: "events".into(),
            timeout: Duration::from_secs(10),
            connections: 1,
            max_body: 16 * 1024 * 1024,
            app_id: None,
            name: "rabbitry-publisher".into(),
            observers: Vec::new(),
            rate: None,
            #[cfg(feature = "schema")]
            schemas: None,
        }
    }

    /// The exchange events are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// Publish `event` with routing key `E::TYPE` and wait for the broker's confirm.
    /// Returns the message id.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<String> {
        self.message(event).send().await
    }

    /// Start a message with options: priority, correlation id, headers, routing key.
    pub fn message<'a, E: Event>(&'a self, event: &'a E) -> Outgoing<'a, E> {
        Outgoing::with_options(self, event, MessageOptions::default())
    }

    /// A pipeline for a stream of publishes: each [`Pipeline::send`] returns as soon as the
    /// message is handed to the connection, up to 1000 confirms stay in flight (see
    /// [`Pipeline::window`]), and [`Pipeline::flush`] waits for them and reports what failed.
    /// The way to publish fast from one task.
    ///
    /// ```no_run
    /// # use rabbitry::{Event, Publisher};
    /// # #[derive(serde::Serialize)] struct Reading { sensor: u32, value: f64 }
    /// # impl Event for Reading { const TYPE: &'static str = "sensor.reading"; }
    /// # async fn run(publisher: Publisher, readings: Vec<Reading>) -> rabbitry::Result<()> {
    /// let mut pipeline = publisher.pipeline();
    /// for reading in &readings {
    ///     let key = format!("sensor.reading.{}", reading.sensor);
    ///     pipeline.send_message(publisher.message(reading).routing_key(key)).await?;
    /// }
    /// pipeline.flush().await?; // every confirm is in, or Error::Batch says which failed
    /// # Ok(()) }
    /// ```
    pub fn pipeline(&self) -> Pipeline<'_> {
        Pipeline::new(self, DEFAULT_WINDOW)
    }

    /// Publish many events with routing key `E::TYPE`, up to 1000 confirms in flight (a
    /// [`Pipeline`]), and wait for every confirm. Each event is serialized as it is sent; one
    /// that fails to serialize or is too large is not sent, the others are. Returns the
    /// message ids in order; [`Error::Batch`] lists every event that was not confirmed, by
    /// position. When the broker cannot be reached, the batch stops there: that event fails
    /// with the connection error and every later one with [`Error::NotSent`]. For a routing
    /// key or options per message, use [`pipeline`](Publisher::pipeline).
    pub async fn publish_batch<'e, E: Event + 'e>(
        &self,
        events: impl IntoIterator<Item = &'e E>,
    ) -> Result<Vec<String>> {
        let mut pipeline = self.pipeline();
        let mut ids = Vec::new();
        let mut refused = Vec::new();
        // The pipeline numbers what it sent; this maps its numbers to batch positions.
        let mut positions = Vec::new();
        let mut events = events.into_iter().enumerate();
        for (i, event) in events.by_ref() {
            match pipeline.send(event).await {
                Ok(id) => {
                    ids.push(id);
                    positions.push(i);
                }
                // Wrong with this one message: the others go on.
                Err(
                    e @ (Error::Serialize(_)
                    | Error::BodyTooLarge { .. }
                    | Error::Config(_)
                    | Error::Invalid { .. }),
                ) => {
                    ids.push(String::new());
                    refused.push((i, e));
                }
                // Wrong with the connection: every later message would fail the same way.
                Err(e) => {
                    ids.push(String::new());
                    refused.push((i, e));
                    for (j, _) in events.by_ref() {
                        ids.push(String::new());
                        refused.push((j, Error::NotSent { cause: i }));
                    }
                    break;
                }
            }
        }
        let total = ids.len();
        let mut failures = match pipeline.flush().await {
            Ok(_) => Vec::new(),
            Err(Error::Batch { failures, .. }) => failures
                .into_iter()
                .map(|(seq, e)| (positions.get(seq).copied().unwrap_or(seq), e))
                .collect(),
            Err(other) => return Err(other),
        };
        failures.extend(refused);
        if failures.is_empty() {
            Ok(ids)
        } else {
            failures.sort_by_key(|(i, _)| *i);
            Err(Error::Batch { total, failures })
        }
    }

    fn prepare<E: Event>(
        &self,
        event: &E,
        options: &MessageOptions,
    ) -> Result<(Vec<u8>, BasicProperties, String)> {
        let body = self.inner.body_of(event)?;
        self.inner.check_size(body.len())?;
        let id = match &options.message_id {
            Some(id) => id.clone(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let headers = options.headers.clone();
        let mut props = event_properties(&id, E::TYPE, E::VERSION, headers, unix_seconds())?;
        if let Some(c) = &options.correlation_id {
            props = props.with_correlation_id(broker::short("correlation id", c)?);
        }
        if let Some(p) = options.priority.or(E::PRIORITY) {
            props = props.with_priority(p);
        }
        if let Some(app) = &self.inner.app_id {
            props = props.with_app_id(app.clone());
        }
        Ok((body, props, id))
    }

    /// Publish `body` with `properties` as they are — no serialization, no schema, no trace
    /// context added — to `exchange` (`""`: the default exchange, whose routing keys are
    /// queue names) under `routing_key`, and wait for the broker's confirm. Mandatory: a
    /// message no queue takes is [`Error::Unroutable`]. For tools that move stored messages
    /// back to the broker (a redrive, a replay) or publish JSON without a Rust type.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        self.inner.check_size(body.len())?;
        broker::short("routing key", routing_key)?;
        broker::short("exchange name", exchange)?;
        self.inner.pace().await;
        self.send_raw(exchange, routing_key, body, properties).await
    }

    /// How many messages are ready in `queue` and how many consumers it has (a passive
    /// declare on a short-lived channel of this publisher's connection); `None` if it does
    /// not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<Option<crate::QueueDepth>> {
        let conn = self.connection().await?;
        let counted = conn
            .on_channel(async |ch| match ch.queue_counts(queue).await {
                Ok(counts) => Ok(Some(counts)),
                Err(e) if broker::reply_code(&e) == Some(NOT_FOUND) => Ok(None),
                Err(e) => Err(Error::from(e)),
            })
            .await?;
        Ok(counted.map(|(ready, consumers)| crate::QueueDepth::new(queue, ready, consumers)))
    }

    /// Move up to `max` messages out of `queue`, one at a time: take one (`basic.get`),
    /// publish it with `edit`'s properties to `exchange` under `routing_key` and wait for
    /// the confirm, and only then acknowledge the original — so a failure leaves it where
    /// it was (the taken message returns to `queue` when the channel closes). Nothing is
    /// browsed or requeued: a quorum queue's delivery count is not spent. Returns how many
    /// moved; stops early when `queue` is empty.
    pub async fn move_messages(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        max: usize,
        edit: impl Fn(BasicProperties) -> BasicProperties,
    ) -> Result<usize> {
        let conn = self.connection().await?;
        let channel = conn.channel().await?;
        let mut moved = 0;
        let result = async {
            while moved < max {
                let Some(message) = channel.get(queue).await? else {
                    break;
                };
                self.send_raw(
                    exchange,
                    routing_key,
                    &message.body,
                    edit(message.properties),
                )
                .await?;
                channel.ack_one(message.tag).await?;
                moved += 1;
            }
            Ok::<_, Error>(())
        }
        .await;
        channel.close().await;
        result.map(|()| moved)
    }

    /// Publish `body` with `properties` to the publisher's exchange under `routing_key`,
    /// held by the broker until `due` when that is later than now (see
    /// [`Outgoing::delay`]), and wait for the confirm. For messages made earlier and kept
    /// (a saga's outgoing events).
    pub(crate) async fn send_kept(
        &self,
        routing_key: &str,
        body: &[u8],
        mut properties: BasicProperties,
        due: Option<SystemTime>,
    ) -> Result<()> {
        let via = self.delay_tier(&mut properties, due).await?;
        let exchange = via.as_deref().unwrap_or(&self.inner.exchange);
        self.send_raw(exchange, routing_key, body, properties).await
    }

    /// The delay tier a message due at `due` enters now (its bits written into
    /// `properties`), the tiers declared first if this publisher has not yet; `None` when
    /// it is not delayed or already due. A wait beyond what the broker holds (a kept
    /// message from a clock far behind) is held for the longest it can.
    async fn delay_tier(
        &self,
        properties: &mut BasicProperties,
        due: Option<SystemTime>,
    ) -> Result<Option<String>> {
        let Some(due) = due else {
            return Ok(None);
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        let wait = wait.min(crate::MAX_DELAY);
        let Some(route) = crate::topology::delay::route(&self.inner.exchange, wait)? else {
            return Ok(None);
        };
        self.ensure_delays().await?;
        let mut table = properties.headers().clone().unwrap_or_default();
        route.mark(&mut table, Some(due));
        *properties = std::mem::take(properties).with_headers(table);
        Ok(Some(route.exchange))
    }

    /// Route a prepared delayed message into its tier, as late as possible.
    async fn route_delayed(&self, message: &mut Prepared) -> Result<()> {
        message.via = self
            .delay_tier(&mut message.properties, message.due)
            .await?;
        Ok(())
    }

    /// Publish a copy of a received message and wait for its confirm (retries and
    /// dead-letters). The outgoing size limit does not apply: the broker already holds it.
    pub(crate) async fn send_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let span = publish_span(exchange, routing_key, &properties);
        self.send(exchange, routing_key, body, properties, true)
            .instrument(span)
            .await
    }

    /// Declare the delay tiers of the exchange, once per publisher.
    async fn ensure_delays(&self) -> Result<()> {
        self.inner
            .delays
            .get_or_try_init(|| async {
                let conn = self.connection().await?;
                conn.on_channel(async |ch| {
                    crate::topology::delay::declare(ch, &self.inner.exchange).await
                })
                .await
            })
            .await?;
        Ok(())
    }

    /// Publish a prepared message to the publisher's exchange and wait for its confirm.
    async fn send_prepared(&self, mut message: Prepared) -> Result<String> {
        self.inner.pace().await;
        let span = self.inner.announce(&mut message);
        self.route_delayed(&mut message).await?;
        let via = message.via.take();
        self.send(
            via.as_deref().unwrap_or(&self.inner.exchange),
            &message.routing_key,
            &message.body,
            message.properties,
            message.mandatory,
        )
        .instrument(span)
        .await?;
        Ok(message.id)
    }

    /// Publish and wait for the confirm; with `mandatory`, an unroutable message is an error.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<()> {
        let id = properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let inner = &self.inner;
        let attempt = async {
            let slot = inner.slot(inner.pick()).await?;
            let confirm = slot
                .channel
                .publish(exchange, routing_key, body, properties, mandatory)
                .await
                .map_err(|e| inner.publish_error(exchange, routing_key, e))?;
            inner.settle(exchange, routing_key, &id, confirm).await
        };
        let result = tokio::time::timeout(inner.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(inner.timeout_error(exchange, routing_key)));
        inner.observe(exchange, routing_key, &id, result.as_ref().map(drop));
        result
    }

    /// The publisher's first connection (opened if needed).
    pub(crate) async fn connection(&self) -> Result<Connection> {
        Ok(self.inner.slot(0).await?.connection.clone())
    }

    /// Close the publisher's connections. Publishes already confirmed are unaffected.
    pub async fn close(&self) {
        for cell in &self.inner.slots {
            if let Some(s) = cell.set(None) {
                s.channel.close().await;
                s.connection.close().await;
            }
        }
        self.inner.pool.close();
    }
}

/// The properties every event rabbitry publishes carries: its message id and type, a
/// timestamp (Unix seconds), JSON, persistent, and `headers` with the event version when it
/// is not 1 (version 1 is what a missing header means: most messages need no header table,
/// which every consumer would otherwise have to parse).
pub(crate) fn event_properties(
    id: &str,
    event_type: &str,
    version: u32,
    mut headers: lapin::types::FieldTable,
    timestamp: u64,
) -> Result<BasicProperties> {
    let mut props = BasicProperties::default()
        .with_message_id(broker::short("message id", id)?)
        .with_type(broker::short("event type", event_type)?)
        .with_timestamp(timestamp)
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if version != 1 {
        let version = AMQPValue::LongLongInt(version.into());
        headers::set(&mut headers, headers::EVENT_VERSION, version);
    }
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    Ok(props)
}

/// The span of one publish, with the OpenTelemetry messaging attributes for RabbitMQ.
pub(crate) fn publish_span(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
) -> tracing::Span {
    let id = properties.message_id().as_ref().map(ShortString::as_str);
    let correlation = properties
        .correlation_id()
        .as_ref()
        .map(ShortString::as_str);
    tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {exchange}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = id,
        messaging.message.conversation_id = correlation,
    )
}

impl Inner {
    /// Open the span of a message about to be published, and let the observers add to its
    /// headers (a trace context) from inside it.
    fn announce(&self, message: &mut Prepared) -> tracing::Span {
        let span = publish_span(&self.exchange, &message.routing_key, &message.properties);
        if !self.observers.is_empty() {
            let mut table = message.properties.headers().clone().unwrap_or_default();
            span.in_scope(|| {
                self.observers.sending(&mut Sending {
                    exchange: &self.exchange,
                    routing_key: &message.routing_key,
                    message_id: &message.id,
                    span: &span,
                    headers: &mut table,
                })
            });
            if !table.inner().is_empty() {
                let properties = std::mem::take(&mut message.properties);
                message.properties = properties.with_headers(table);
            }
        }
        span
    }

    /// Tell the observers how a publish ended.
    fn observe(&self, exchange: &str, routing_key: &str, id: &str, result: Result<(), &Error>) {
        let outcome = match result {
            Ok(()) => PublishOutcome::Confirmed,
            Err(Error::Unroutable { .. }) => PublishOutcome::Unroutable,
            Err(Error::Nacked { .. }) => PublishOutcome::Nacked,
            Err(_) => PublishOutcome::Failed,
        };
        // The publish span (`send` and the pipeline run inside it), never a caller's span.
        let span = tracing::Span::current();
        if span.metadata().is_some_and(|m| m.name() == "publish") {
            span.record("outcome", outcome.as_str());
            if outcome != PublishOutcome::Confirmed {
                span.record("otel.status_code", "ERROR");
            }
        }
        if self.observers.is_empty() {
            return;
        }
        self.observers.published(&Published {
            exchange,
            routing_key,
            message_id: id,
            outcome,
            error: result.err(),
        });
    }

    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    fn check_size(&self, size: usize) -> Result<()> {
        if size > self.max_body {
            return Err(Error::BodyTooLarge {
                size,
                limit: self.max_body,
            });
        }
        Ok(())
    }

    /// `event` as JSON, checked against its type's schema if one was registered.
    fn body_of<E: Event>(&self, event: &E) -> Result<Vec<u8>> {
        #[cfg(feature = "schema")]
        if let Some(schema) = self.schemas.as_ref().and_then(|s| s.get(E::TYPE)) {
            let value = serde_json::to_value(event).map_err(Error::Serialize)?;
            if let Err(violations) = schema.check(&value) {
                return Err(Error::Invalid {
                    event_type: E::TYPE.to_owned(),
                    reason: violations.to_string(),
                });
            }
            return serde_json::to_vec(&value).map_err(Error::Serialize);
        }
        serde_json::to_vec(event).map_err(Error::Serialize)
    }

    /// Wait for the rate limit's next slot, if there is a limit.
    async fn pace(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// Slot `i`, its channel reopened (on a fresh pooled connection) if it died.
    async fn slot(&self, i: usize) -> Result<Arc<Slot>> {
        let cell = &self.slots[i];
        if let Some(live) = cell.open() {
            return Ok(live);
        }
        let _reopening = cell.reopening.lock().await;
        if let Some(live) = cell.open() {
            return Ok(live); // reopened while we waited
        }
        // Give a dead connection back; the pool's recycle check discards it.
        cell.set(None);
        // Within the publish timeout: a broker that accepts the TCP connection but does not
        // answer (one still starting, say) must make a publish fail, never hang it.
        let reopen = async {
            let connection = self.pool.get().await?;
            let channel = connection.channel().await?;
            channel.confirm_select().await?;
            Ok::<_, Error>(Slot {
                connection,
                channel,
            })
        };
        let slot = match tokio::time::timeout(self.timeout, reopen).await {
            Ok(slot) => Arc::new(slot?),
            Err(_) => return Err(self.pool.timed_out(self.timeout)),
        };
        cell.set(Some(slot.clone()));
        Ok(slot)
    }

    async fn settle(
        &self,
        exchange: &str,
        routing_key: &str,
        id: &str,
        confirm: impl Future<Output = lapin::Result<Confirm>>,
    ) -> Result<()> {
        let returned = match confirm.await {
            Ok(Confirm::Ack { returned }) => returned,
            Ok(Confirm::Nack) => {
                return Err(Error::Nacked {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                });
            }
            Err(e) => return Err(self.publish_error(exchange, routing_key, e)),
        };
        let unroutable = self.returns.settle(id, returned);
        if unroutable {
            return Err(Error::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        Ok(())
    }

    fn timeout_error(&self, exchange: &str, routing_key: &str) -> Error {
        Error::PublishTimeout {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            timeout: self.timeout,
        }
    }

    fn publish_error(&self, exchange: &str, routing_key: &str, e: lapin::Error) -> Error {
        if broker::reply_code(&e) == Some(NOT_FOUND) {
            return Error::ExchangeNotFound {
                exchange: exchange.to_owned(),
            };
        }
        Error::NotConfirmed {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            source: BrokerError::from(e),
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Ping(u8);
    impl Event for Ping {
        const TYPE: &'static str = "ping";
    }

    #[tokio::test]
    async fn a_batch_that_cannot_reach_the_broker_stops_and_lists_every_event() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let publisher = Publisher::builder(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
            .build()
            .unwrap();
        let err = publisher
            .publish_batch(&[Ping(1), Ping(2), Ping(3)])
            .await
            .unwrap_err();
        let Error::Batch { total, failures } = err else {
            panic!("{err:?}")
        };
        assert_eq!(total, 3);
        assert!(
            matches!(failures[0], (0, Error::Connect { .. })),
            "{failures:?}"
        );
        assert!(matches!(
            failures[1..],
            [
                (1, Error::NotSent { cause: 0 }),
                (2, Error::NotSent { cause: 0 })
            ]
        ));
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let builder = Publisher::builder("amqp://app:s3cret@broker:5672/%2f");
        let shown = format!("{builder:?}");
        assert!(
            shown.contains("app:***@broker") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
