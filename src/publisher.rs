//! Publishing events with publisher confirms.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::{self, Channel, Confirm, Connection, NOT_FOUND};
use crate::error::{BrokerError, Error, Result};
use crate::event::Event;
use crate::headers;

/// Confirms kept in flight at once by [`Publisher::publish_batch`].
const BATCH_WINDOW: usize = 1000;
/// Returned-message ids kept for the publish they belong to (see [`Publisher`] docs).
const MAX_ORPHANS: usize = 1024;

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

/// Configures a [`Publisher`].
#[derive(Clone)]
pub struct PublisherBuilder {
    url: String,
    exchange: String,
    timeout: Duration,
    connections: usize,
    max_body: usize,
    app_id: Option<String>,
    name: String,
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

impl fmt::Debug for PublisherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field("url", &broker::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .field("max_body", &self.max_body)
            .field("app_id", &self.app_id)
            .field("name", &self.name)
            .finish()
    }
}

impl PublisherBuilder {
    /// Publish to this exchange (default `events`).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Fail a publish that is not confirmed within `timeout` (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Number of connections, each with one confirm channel (default 1, which keeps
    /// messages from one task in order).
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections;
        self
    }

    /// Refuse bodies larger than this many bytes (default 16 MiB, RabbitMQ 4's default
    /// `max_message_size`).
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }

    /// The `app_id` property (default: the executable's name).
    pub fn app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = Some(app_id.into());
        self
    }

    /// The connection name shown in the management UI (default `rabbitry-publisher`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Check the settings and connect.
    pub async fn connect(self) -> Result<Publisher> {
        let publisher = self.build()?;
        // Connect now, so that a wrong URL or a stopped broker is reported here.
        publisher.inner.slot(0).await?;
        Ok(publisher)
    }

    /// Check the settings; the connection opens on the first publish.
    pub(crate) fn build(self) -> Result<Publisher> {
        if self.connections == 0 {
            return Err(Error::Config(
                "publisher connections must be at least 1".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config(
                "publish timeout must be longer than zero".into(),
            ));
        }
        broker::short("exchange name", &self.exchange)?;
        let app_id = match self.app_id.or_else(executable_name) {
            Some(id) => Some(broker::short("app_id", &id)?),
            None => None,
        };
        let pool = broker::Pool::new(&self.url, self.name, self.connections)?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                url: broker::redact_url(&self.url),
                pool,
                slots: (0..self.connections).map(|_| SlotCell::default()).collect(),
                next: AtomicUsize::new(0),
                exchange: self.exchange,
                timeout: self.timeout,
                max_body: self.max_body,
                app_id,
                returns: Returns::default(),
            }),
        })
    }
}

fn executable_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.file_stem()?.to_string_lossy().into_owned())
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
    pub fn message<'a, E: Event>(&'a self, event: &'a E) -> Message<'a, E> {
        Message {
            publisher: self,
            event,
            options: MessageOptions::default(),
        }
    }

    /// Publish many events with their confirms in flight together (up to 1000 at a time)
    /// instead of one round trip each. Nothing is sent if any event fails to serialize or is
    /// too large. Returns the message ids in order; [`Error::Batch`] lists what failed.
    pub async fn publish_batch<'e, E: Event + 'e>(
        &self,
        events: impl IntoIterator<Item = &'e E>,
    ) -> Result<Vec<String>> {
        let prepared = events
            .into_iter()
            .map(|e| {
                let (body, props, id) = self.prepare(e, &MessageOptions::default())?;
                Ok((body, props, id))
            })
            .collect::<Result<Vec<_>>>()?;
        let total = prepared.len();
        let (exchange, inner) = (self.inner.exchange.as_str(), &self.inner);
        let slot = inner.slot(inner.pick()).await?;
        let ch = &slot.channel;
        let mut ids = Vec::with_capacity(total);
        let mut failures = Vec::new();
        // Each future sends its message when first polled, which happens in push order, so
        // the batch goes out in order while up to BATCH_WINDOW confirms are outstanding.
        let mut in_flight = FuturesUnordered::new();
        for (i, (body, props, id)) in prepared.into_iter().enumerate() {
            while in_flight.len() >= BATCH_WINDOW {
                if let Some((j, Err(e))) = in_flight.next().await {
                    failures.push((j, e));
                }
            }
            ids.push(id.clone());
            in_flight.push(async move {
                let sent = async {
                    let confirm = ch
                        .publish(exchange, E::TYPE, &body, props, true)
                        .await
                        .map_err(|e| inner.publish_error(exchange, E::TYPE, e))?;
                    inner.settle(exchange, E::TYPE, &id, confirm).await
                };
                let result = tokio::time::timeout(inner.timeout, sent)
                    .await
                    .unwrap_or_else(|_| Err(inner.timeout_error(exchange, E::TYPE)));
                (i, result)
            });
        }
        while let Some((j, r)) = in_flight.next().await {
            if let Err(e) = r {
                failures.push((j, e));
            }
        }
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
        let body = serde_json::to_vec(event).map_err(Error::Serialize)?;
        self.inner.check_size(body.len())?;
        let id = match &options.message_id {
            Some(id) => id.clone(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let mut props = BasicProperties::default()
            .with_message_id(broker::short("message id", &id)?)
            .with_type(broker::short("event type", E::TYPE)?)
            .with_timestamp(unix_seconds())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        // Version 1 is what a missing header means: most messages need no header table,
        // which every consumer would otherwise have to parse.
        if E::VERSION != 1 || !options.headers.inner().is_empty() {
            let mut headers = options.headers.clone();
            if E::VERSION != 1 {
                let version = AMQPValue::LongLongInt(E::VERSION.into());
                headers::set(&mut headers, headers::EVENT_VERSION, version);
            }
            props = props.with_headers(headers);
        }
        if let Some(c) = &options.correlation_id {
            props = props.with_correlation_id(broker::short("correlation id", c)?);
        }
        if let Some(p) = options.priority {
            props = props.with_priority(p);
        }
        if let Some(app) = &self.inner.app_id {
            props = props.with_app_id(app.clone());
        }
        Ok((body, props, id))
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
        self.send(exchange, routing_key, body, properties, true)
            .await
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
        tokio::time::timeout(inner.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(inner.timeout_error(exchange, routing_key)))
    }

    /// A channel on the publisher's connection, for declarations made on demand.
    pub(crate) async fn declaring_channel(&self) -> Result<Channel> {
        self.connection().await?.channel().await
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

impl Inner {
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
        let connection = self.pool.get().await?;
        let channel = connection.channel().await?;
        channel.confirm_select().await?;
        let slot = Arc::new(Slot {
            connection,
            channel,
        });
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

/// Returned (unroutable) messages, matched to their own publish by message id.
///
/// The AMQP client attaches a returned message to whichever confirm it resolves next, which
/// under a multiple-acknowledgement may be another message's. A return that is not ours is
/// kept here for its owner, who looks for it when its own confirm carries none.
#[derive(Default)]
struct Returns {
    orphans: Mutex<VecDeque<String>>,
    /// Mirrors the ledger's length, so that the common case (no return anywhere) takes no lock.
    pending: AtomicUsize,
}

impl Returns {
    /// Whether the message `id` was returned, given what its own confirm carried.
    fn settle(&self, id: &str, returned: Option<Option<String>>) -> bool {
        if !matches!(returned, Some(Some(_))) && self.pending.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        let unroutable = Self::settle_locked(&mut orphans, id, returned);
        self.pending.store(orphans.len(), Ordering::Release);
        unroutable
    }

    fn settle_locked(
        orphans: &mut VecDeque<String>,
        id: &str,
        returned: Option<Option<String>>,
    ) -> bool {
        match returned {
            Some(Some(returned_id)) if returned_id == id => return true,
            Some(Some(other)) => {
                if orphans.len() == MAX_ORPHANS {
                    orphans.pop_front();
                }
                orphans.push_back(other);
            }
            _ => {}
        }
        match orphans.iter().position(|o| o == id) {
            Some(i) => orphans.remove(i).is_some(),
            None => false,
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, Default)]
pub(crate) struct MessageOptions {
    pub(crate) priority: Option<u8>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) routing_key: Option<String>,
    pub(crate) headers: FieldTable,
    pub(crate) allow_unroutable: bool,
    /// A header key that AMQP cannot carry, reported by `send`.
    pub(crate) bad_header: Option<String>,
}

/// A message being prepared by [`Publisher::message`] or
/// [`Context::message`](crate::Context::message); [`send`](Message::send) publishes it.
#[must_use = "a message is only published by .send().await"]
#[derive(Debug)]
pub struct Message<'a, E> {
    publisher: &'a Publisher,
    event: &'a E,
    options: MessageOptions,
}

impl<'a, E: Event> Message<'a, E> {
    pub(crate) fn with_options(
        publisher: &'a Publisher,
        event: &'a E,
        options: MessageOptions,
    ) -> Self {
        Message {
            publisher,
            event,
            options,
        }
    }

    /// The message priority (0..=255; a priority queue caps it at its `max_priority`).
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority);
        self
    }

    /// The correlation id (at most 255 bytes).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.options.correlation_id = Some(id.into());
        self
    }

    /// Use this message id instead of a generated UUID v7 (at most 255 bytes), for example
    /// to make a re-publish recognisable as a duplicate.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.options.message_id = Some(id.into());
        self
    }

    /// Route with this key instead of the event type (for example `order.placed.eu`).
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.options.routing_key = Some(key.into());
        self
    }

    /// Succeed even if no queue is bound for the message's routing key (it is then
    /// dropped by the broker). For events that may legitimately have no subscriber yet;
    /// by default an unroutable message is an [`Error::Unroutable`].
    pub fn allow_unroutable(mut self) -> Self {
        self.options.allow_unroutable = true;
        self
    }

    /// Add a string header (the key may be at most 255 bytes, or `send` fails).
    pub fn header(mut self, key: &str, value: impl AsRef<str>) -> Self {
        match ShortString::try_new(key) {
            Ok(k) => {
                self.options
                    .headers
                    .insert(k, headers::string(value.as_ref()));
            }
            Err(_) => self.options.bad_header = Some(key.to_owned()),
        }
        self
    }

    /// Publish and wait for the broker's confirm; returns the message id.
    pub async fn send(self) -> Result<String> {
        if let Some(key) = &self.options.bad_header {
            return Err(Error::Config(format!(
                "header key '{}…' is {} bytes; AMQP allows at most 255",
                key.chars().take(32).collect::<String>(),
                key.len()
            )));
        }
        let routing_key = self.options.routing_key.as_deref().unwrap_or(E::TYPE);
        broker::short("routing key", routing_key)?;
        let (body, props, id) = self.publisher.prepare(self.event, &self.options)?;
        let mandatory = !self.options.allow_unroutable;
        self.publisher
            .send(
                self.publisher.exchange(),
                routing_key,
                &body,
                props,
                mandatory,
            )
            .await?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let builder = Publisher::builder("amqp://app:s3cret@broker:5672/%2f");
        let shown = format!("{builder:?}");
        assert!(
            shown.contains("app:***@broker") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn a_return_handed_to_another_confirm_reaches_its_owner() {
        let returns = Returns::default();
        // "a" was confirmed carrying the return of "b".
        assert!(!returns.settle("a", Some(Some("b".into()))));
        assert!(returns.settle("b", None));
        // Claimed once only.
        assert!(!returns.settle("b", None));
    }

    #[test]
    fn own_returns_and_plain_acks() {
        let returns = Returns::default();
        assert!(returns.settle("a", Some(Some("a".into()))));
        assert!(!returns.settle("c", None));
        assert!(!returns.settle("d", Some(None)));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let returns = Returns::default();
        for i in 0..MAX_ORPHANS + 10 {
            returns.settle("x", Some(Some(i.to_string())));
        }
        assert_eq!(returns.orphans.lock().unwrap().len(), MAX_ORPHANS);
        assert!(!returns.settle("0", None), "the oldest was dropped");
        assert!(returns.settle(&(MAX_ORPHANS + 9).to_string(), None));
    }
}
