//! Events and the deliveries that carry them to handlers.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::headers;

/// A type that is published as an event.
///
/// The event type is the routing key on the topic exchange, so workers subscribe to it by
/// name or by pattern (`order.*`, `order.#`). Use lowercase dot-separated words.
///
/// ```
/// use rabbitry::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced {
///     order_id: u64,
/// }
///
/// impl Event for OrderPlaced {
///     const TYPE: &'static str = "order.placed";
/// }
/// ```
pub trait Event: Serialize {
    /// The event type: the routing key and the AMQP `type` property.
    const TYPE: &'static str;
    /// The schema version, sent in the `x-event-version` header when it is not 1.
    const VERSION: u32 = 1;
}

/// Broker-level facts about one received message, shared by the runtime and the handler.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) queue: Arc<str>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: BasicProperties,
    /// A message id made up for a message that arrived without one.
    generated_id: Option<String>,
    pub(crate) retry_count: u32,
}

impl Envelope {
    /// Build the envelope of a message received from `queue`.
    pub(crate) fn new(
        queue: Arc<str>,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        properties: BasicProperties,
    ) -> Envelope {
        let headers = properties.headers().as_ref();
        // A retried message was re-routed through the default exchange: restore where it came from.
        let exchange = match headers::get_str(headers, headers::ORIGINAL_EXCHANGE) {
            Some(original) => original.to_owned(),
            None => exchange,
        };
        let routing_key = match headers::get_str(headers, headers::ORIGINAL_ROUTING_KEY) {
            Some(original) => original.to_owned(),
            None => routing_key,
        };
        let retry_count = headers::get_u64(headers, headers::RETRY_COUNT)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        let generated_id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => None,
            _ => Some(uuid::Uuid::now_v7().to_string()),
        };
        Envelope {
            queue,
            exchange,
            routing_key,
            redelivered,
            generated_id,
            retry_count,
            properties,
        }
    }

    /// The message id: the received one, or the one made up for it.
    pub(crate) fn message_id(&self) -> &str {
        match (&self.generated_id, self.properties.message_id()) {
            (Some(generated), _) => generated,
            (None, Some(id)) => id.as_str(),
            (None, None) => unreachable!("an envelope without a message id gets a generated one"),
        }
    }

    /// The correlation id, or the message id when there is none.
    pub(crate) fn correlation_id(&self) -> &str {
        self.properties
            .correlation_id()
            .as_ref()
            .map_or_else(|| self.message_id(), |c| c.as_str())
    }

    /// The event type: the `type` property, or the routing key when it is absent.
    pub(crate) fn event_type(&self) -> &str {
        self.properties
            .kind()
            .as_ref()
            .map_or(&self.routing_key, |t| t.as_str())
    }

    /// The 1-based attempt number of this delivery.
    pub(crate) fn attempt(&self) -> u32 {
        self.retry_count.saturating_add(1)
    }
}

/// A decoded event and everything known about the message that carried it.
///
/// `Delivery<T>` dereferences to `T`, so fields of the event read directly:
/// `order.order_id`. Use [`into_payload`](Delivery::into_payload) to take the event out.
#[derive(Debug)]
pub struct Delivery<T> {
    payload: T,
    envelope: Arc<Envelope>,
}

impl<T> Delivery<T> {
    pub(crate) fn new(payload: T, envelope: Arc<Envelope>) -> Self {
        Delivery { payload, envelope }
    }

    /// The decoded event.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// Take the decoded event out.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The message id: stable across retries, so handlers can use it for idempotency.
    ///
    /// A message that arrived without one (from a plain AMQP client) gets a UUID v7 on
    /// its first delivery, which its retries keep.
    pub fn message_id(&self) -> &str {
        self.envelope.message_id()
    }

    /// The event type: the AMQP `type` property, or the routing key when it is absent.
    pub fn event_type(&self) -> &str {
        self.envelope.event_type()
    }

    /// The event's schema version from `x-event-version`, if the publisher sent one.
    /// rabbitry publishers send it only for versions other than 1: `None` from them means 1.
    pub fn event_version(&self) -> Option<u32> {
        headers::get_u64(self.headers(), headers::EVENT_VERSION).and_then(|v| u32::try_from(v).ok())
    }

    /// When the message was published, if the publisher set the `timestamp` property.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.envelope
            .properties
            .timestamp()
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.envelope
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str())
    }

    /// The message's headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.envelope.properties.headers().as_ref()
    }

    /// All AMQP properties of the message as received.
    pub fn properties(&self) -> &BasicProperties {
        &self.envelope.properties
    }

    /// The exchange the message was originally published to (kept across retries).
    pub fn exchange(&self) -> &str {
        &self.envelope.exchange
    }

    /// The routing key the message was originally published with (kept across retries).
    pub fn routing_key(&self) -> &str {
        &self.envelope.routing_key
    }

    /// The queue the message was consumed from.
    pub fn queue(&self) -> &str {
        &self.envelope.queue
    }

    /// 1 on the first delivery, 2 on the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.envelope.attempt()
    }

    /// True when the broker delivered this message before without an acknowledgement
    /// (a consumer crashed or its connection dropped): the handler may have run already.
    pub fn redelivered(&self) -> bool {
        self.envelope.redelivered
    }

    /// The message priority, if the publisher set one.
    pub fn priority(&self) -> Option<u8> {
        *self.envelope.properties.priority()
    }
}

impl<T> Deref for Delivery<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    #[test]
    fn retried_message_reports_its_original_route_and_attempt() {
        let mut h = FieldTable::default();
        headers::set(
            &mut h,
            headers::ORIGINAL_EXCHANGE,
            headers::string("events"),
        );
        headers::set(
            &mut h,
            headers::ORIGINAL_ROUTING_KEY,
            headers::string("order.placed"),
        );
        headers::set(&mut h, headers::RETRY_COUNT, AMQPValue::LongInt(2));
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id("m-1".into());
        let env = Envelope::new(
            "orders.email".into(),
            String::new(),
            "orders.email".into(),
            false,
            props,
        );
        let d = Delivery::new((), Arc::new(env));
        assert_eq!(d.exchange(), "events");
        assert_eq!(d.routing_key(), "order.placed");
        assert_eq!(d.attempt(), 3);
        assert_eq!(d.message_id(), "m-1");
        assert_eq!(d.event_type(), "order.placed");
    }

    #[test]
    fn bare_message_gets_an_id_and_first_attempt() {
        let env = Envelope::new(
            "q".into(),
            "events".into(),
            "order.placed".into(),
            true,
            BasicProperties::default(),
        );
        let d = Delivery::new(1u8, Arc::new(env));
        assert_eq!(d.attempt(), 1);
        assert!(uuid::Uuid::parse_str(d.message_id()).is_ok());
        assert!(d.redelivered());
        assert_eq!(*d, 1);
    }
}
