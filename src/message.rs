//! The raw request every handler stack sees: a received message's metadata and its body.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::de::DeserializeOwned;

use crate::headers;

/// Broker-level facts about one received message: where it came from, its properties and
/// headers, and which attempt this is.
///
/// Shared by the [`Message`] a layer sees, the [`Delivery`](crate::Delivery) a handler sees
/// and the runtime that settles the message, so reading it costs nothing. Headers come from
/// any AMQP client: the typed readers ([`header_str`](Metadata::header_str),
/// [`header_u64`](Metadata::header_u64)) accept every encoding of a value and never panic.
#[derive(Debug, Clone)]
pub struct Metadata {
    queue: Arc<str>,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    properties: BasicProperties,
    /// A message id made up for a message that arrived without one.
    generated_id: Option<String>,
    retry_count: u32,
    max_attempts: u32,
    /// The retry policy's delay after this attempt, if it is not the last.
    next_retry: Option<Duration>,
}

impl Metadata {
    /// The metadata of a message received from `queue`, as the broker delivered it.
    ///
    /// A retried message was re-routed through the default exchange: its original exchange
    /// and routing key are restored from `x-original-exchange` and `x-original-routing-key`.
    /// `x-retry-count` counts the retries made in *this* queue: a message that failed in
    /// another queue (consumed from a dead-letter queue, say) starts again at attempt 1.
    /// A message without a message id gets a UUID v7.
    pub(crate) fn new(
        queue: Arc<str>,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        properties: BasicProperties,
    ) -> Metadata {
        let headers = properties.headers().as_ref();
        let exchange = match headers::get_str(headers, headers::ORIGINAL_EXCHANGE) {
            Some(original) => original.to_owned(),
            None => exchange,
        };
        let routing_key = match headers::get_str(headers, headers::ORIGINAL_ROUTING_KEY) {
            Some(original) => original.to_owned(),
            None => routing_key,
        };
        let failed_here = headers::get_str(headers, headers::ORIGINAL_QUEUE)
            .is_none_or(|original| original == &*queue);
        let retry_count = match failed_here {
            true => headers::get_u64(headers, headers::RETRY_COUNT)
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            false => 0,
        };
        let generated_id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => None,
            _ => Some(uuid::Uuid::now_v7().to_string()),
        };
        Metadata {
            queue,
            exchange,
            routing_key,
            redelivered,
            properties,
            generated_id,
            retry_count,
            max_attempts: u32::MAX,
            next_retry: None,
        }
    }

    /// Received by a worker with this retry policy.
    pub(crate) fn with_retry_policy(mut self, policy: &crate::retry::RetryPolicy) -> Metadata {
        self.max_attempts = policy.attempts();
        self.next_retry =
            (!self.is_last_attempt()).then(|| policy.delay_before_retry(self.attempt()));
        self
    }

    /// How long a retry of this delivery would wait under the worker's policy (`None` on
    /// the last attempt, or outside a worker).
    pub(crate) fn next_retry(&self) -> Option<Duration> {
        self.next_retry
    }

    /// Whether this is the worker's last attempt: a retry now would be dead-lettered
    /// instead, as the retry policy's attempts are spent.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt() >= self.max_attempts
    }

    /// The message id: stable across retries, so handlers can use it for idempotency.
    ///
    /// A message that arrived without one (from a plain AMQP client) gets a UUID v7 on its
    /// first delivery, which its retries keep.
    pub fn message_id(&self) -> &str {
        match &self.generated_id {
            Some(generated) => generated,
            None => self
                .properties
                .message_id()
                .as_ref()
                .map_or("", |id| id.as_str()),
        }
    }

    /// Whether the message arrived with an id. When it did not (bare AMQP clients often
    /// send none), [`message_id`](Metadata::message_id) is one rabbitry made up on receipt,
    /// different on every delivery of the original, so it cannot tell a duplicate (retry
    /// and dead-letter copies carry the made-up id, so their deliveries do have one).
    pub fn has_message_id(&self) -> bool {
        self.generated_id.is_none()
    }

    /// The event type: the AMQP `type` property, or the routing key when it is absent.
    pub fn event_type(&self) -> &str {
        self.properties
            .kind()
            .as_ref()
            .map_or(&self.routing_key, |t| t.as_str())
    }

    /// The event's schema version from `x-event-version`, if the publisher sent one.
    /// rabbitry publishers send it only for versions other than 1: `None` from them means 1.
    pub fn event_version(&self) -> Option<u32> {
        self.header_u64(headers::EVENT_VERSION)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// The correlation id, if the message has one.
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str())
    }

    /// The correlation id follow-up events get: the message's own, or its message id.
    pub(crate) fn conversation_id(&self) -> &str {
        self.correlation_id().unwrap_or_else(|| self.message_id())
    }

    /// When the message was published, if the publisher set the `timestamp` property (and
    /// it is a time this system can represent).
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.properties
            .timestamp()
            .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
    }

    /// The `app_id` property: which application published the message, if it said.
    pub fn app_id(&self) -> Option<&str> {
        self.properties.app_id().as_ref().map(|a| a.as_str())
    }

    /// The `content_type` property, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|c| c.as_str())
    }

    /// The `content_encoding` property, if set.
    pub fn content_encoding(&self) -> Option<&str> {
        self.properties
            .content_encoding()
            .as_ref()
            .map(|c| c.as_str())
    }

    /// The message priority, if the publisher set one.
    pub fn priority(&self) -> Option<u8> {
        *self.properties.priority()
    }

    /// The message's headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// A string header (long or short string, valid UTF-8); `None` when absent or of
    /// another type.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        headers::get_str(self.headers(), key)
    }

    /// A non-negative integer header, whatever integer (or decimal string) encoding the
    /// sender used; `None` when absent, negative or not a number.
    pub fn header_u64(&self, key: &str) -> Option<u64> {
        headers::get_u64(self.headers(), key)
    }

    /// All AMQP properties of the message as received.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The exchange the message was originally published to (kept across retries).
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key the message was originally published with (kept across retries).
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The queue the message was consumed from: the worker's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// 1 on the first delivery, 2 on the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.retry_count.saturating_add(1)
    }

    /// Retries already made in this queue (`x-retry-count`).
    pub(crate) fn retry_count(&self) -> u32 {
        self.retry_count
    }

    /// True when the broker delivered this message before without an acknowledgement
    /// (a consumer crashed or its connection dropped): the handler may have run already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
}

/// One received message as the handler stack sees it: its [`Metadata`] and its body, the
/// exact bytes the broker delivered.
///
/// The runtime hands a `Message` to the worker's [tower] stack; the innermost service
/// decodes the body into the worker's event type. A layer can therefore read, rewrite or
/// check the JSON before it is typed. Rewriting changes what the handler sees, never the
/// copy that is retried or dead-lettered: those carry the message as it was received.
///
/// [tower]: https://docs.rs/tower
#[derive(Debug, Clone)]
pub struct Message {
    metadata: Arc<Metadata>,
    body: Bytes,
}

impl Message {
    pub(crate) fn new(metadata: Arc<Metadata>, body: Bytes) -> Message {
        Message { metadata, body }
    }

    /// The message's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Replace the body (for example with rewritten JSON).
    pub fn set_body(&mut self, body: impl Into<Bytes>) {
        self.body = body.into();
    }

    /// Set header `key` to `value` on this message, for the layers below and the handler.
    /// Retry and dead-letter copies carry the message as it was received, without it. What
    /// the metadata computed on receipt — the attempt, the original exchange and routing
    /// key — does not change.
    pub fn set_header(&mut self, key: &str, value: AMQPValue) {
        let metadata = Arc::make_mut(&mut self.metadata);
        let mut table = metadata.properties.headers().clone().unwrap_or_default();
        headers::set(&mut table, key, value);
        metadata.properties = std::mem::take(&mut metadata.properties).with_headers(table);
    }

    /// Decode the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }

    /// The metadata (shared) and the body.
    pub fn into_parts(self) -> (Arc<Metadata>, Bytes) {
        (self.metadata, self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            headers::set(&mut h, k, v.clone());
        }
        h
    }

    #[test]
    fn retried_message_reports_its_original_route_and_attempt() {
        let h = headers(&[
            (headers::ORIGINAL_EXCHANGE, headers::string("events")),
            (
                headers::ORIGINAL_ROUTING_KEY,
                headers::string("order.placed"),
            ),
            (headers::ORIGINAL_QUEUE, headers::string("orders.email")),
            (headers::RETRY_COUNT, AMQPValue::LongInt(2)),
        ]);
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id("m-1".into());
        let m = Metadata::new(
            "orders.email".into(),
            String::new(),
            "orders.email".into(),
            false,
            props,
        );
        assert_eq!(m.exchange(), "events");
        assert_eq!(m.routing_key(), "order.placed");
        assert_eq!(m.attempt(), 3);
        assert_eq!(m.message_id(), "m-1");
        assert_eq!(m.event_type(), "order.placed");
        assert_eq!(m.conversation_id(), "m-1");
    }

    #[test]
    fn retries_made_in_another_queue_do_not_count_here() {
        let h = headers(&[
            (headers::ORIGINAL_QUEUE, headers::string("orders.email")),
            (headers::RETRY_COUNT, AMQPValue::LongInt(4)),
        ]);
        let props = BasicProperties::default().with_headers(h);
        let m = Metadata::new(
            "orders.email.dlq".into(),
            "events.dlx".into(),
            "orders.email".into(),
            false,
            props,
        );
        assert_eq!(m.attempt(), 1);
    }

    #[test]
    fn bare_message_gets_an_id_and_first_attempt() {
        let m = Metadata::new(
            "q".into(),
            "events".into(),
            "order.placed".into(),
            true,
            BasicProperties::default(),
        );
        assert_eq!(m.attempt(), 1);
        assert!(uuid::Uuid::parse_str(m.message_id()).is_ok());
        assert!(m.redelivered());
        assert_eq!(m.event_version(), None);
        assert_eq!(m.timestamp(), None);
    }

    #[test]
    fn a_timestamp_out_of_range_reads_as_absent() {
        let props = BasicProperties::default().with_timestamp(u64::MAX);
        let m = Metadata::new("q".into(), "x".into(), "k".into(), false, props);
        assert_eq!(m.timestamp(), None);
        let props = BasicProperties::default().with_timestamp(1_700_000_000);
        let m = Metadata::new("q".into(), "x".into(), "k".into(), false, props);
        assert!(m.timestamp().is_some());
    }

    #[test]
    fn a_new_body_is_what_json_reads() {
        let meta = Arc::new(Metadata::new(
            "q".into(),
            "events".into(),
            "a.b".into(),
            false,
            BasicProperties::default().with_message_id("x".into()),
        ));
        let mut msg = Message::new(meta.clone(), Bytes::from_static(b"{\"a\":1}"));
        msg.set_body(&b"{}"[..]);
        assert_eq!(msg.metadata().message_id(), "x");
        assert_eq!(
            msg.json::<serde_json::Value>().unwrap(),
            serde_json::json!({})
        );
    }
}
