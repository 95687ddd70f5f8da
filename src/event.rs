//! Events and the deliveries that carry them to handlers.

use std::ops::Deref;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::message::Metadata;

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
    /// The priority every message of this type is published with, unless the message sets
    /// its own ([`Outgoing::priority`](crate::Outgoing::priority)). In a queue with a
    /// [`max_priority`](crate::Subscription::max_priority), higher-priority types overtake
    /// the waiting messages of lower ones. `None` (the default) sends no priority, which
    /// the broker treats as 0.
    const PRIORITY: Option<u8> = None;
}

/// A decoded event and everything known about the message that carried it.
///
/// `Delivery<T>` dereferences to `T`, so fields of the event read directly:
/// `order.order_id`. Use [`into_payload`](Delivery::into_payload) to take the event out,
/// [`metadata`](Delivery::metadata) for everything the broker said about the message, and
/// [`body`](Delivery::body) for the exact bytes the event was decoded from.
#[derive(Debug)]
pub struct Delivery<T> {
    payload: T,
    metadata: Arc<Metadata>,
    body: Bytes,
}

impl<T> Delivery<T> {
    pub(crate) fn new(payload: T, metadata: Arc<Metadata>, body: Bytes) -> Self {
        Delivery {
            payload,
            metadata,
            body,
        }
    }

    pub(crate) fn metadata_arc(&self) -> Arc<Metadata> {
        self.metadata.clone()
    }

    /// The decoded event.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// Take the decoded event out.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// Everything known about the message: properties, headers, route, attempt.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The body the event was decoded from, byte for byte (after any layer rewrote it).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The message id: stable across retries, so handlers can use it for idempotency.
    ///
    /// A message that arrived without one (from a plain AMQP client) gets a UUID v7 on
    /// its first delivery, which its retries keep.
    pub fn message_id(&self) -> &str {
        self.metadata.message_id()
    }

    /// The event type: the AMQP `type` property, or the routing key when it is absent.
    pub fn event_type(&self) -> &str {
        self.metadata.event_type()
    }

    /// The event's schema version from `x-event-version`, if the publisher sent one.
    /// rabbitry publishers send it only for versions other than 1: `None` from them means 1.
    pub fn event_version(&self) -> Option<u32> {
        self.metadata.event_version()
    }

    /// When the message was published, if the publisher set the `timestamp` property.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.metadata.timestamp()
    }

    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata.correlation_id()
    }

    /// The message's headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.metadata.headers()
    }

    /// All AMQP properties of the message as received.
    pub fn properties(&self) -> &BasicProperties {
        self.metadata.properties()
    }

    /// The exchange the message was originally published to (kept across retries).
    pub fn exchange(&self) -> &str {
        self.metadata.exchange()
    }

    /// The routing key the message was originally published with (kept across retries).
    pub fn routing_key(&self) -> &str {
        self.metadata.routing_key()
    }

    /// The queue the message was consumed from.
    pub fn queue(&self) -> &str {
        self.metadata.queue()
    }

    /// 1 on the first delivery, 2 on the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.metadata.attempt()
    }

    /// True when the broker delivered this message before without an acknowledgement
    /// (a consumer crashed or its connection dropped): the handler may have run already.
    pub fn redelivered(&self) -> bool {
        self.metadata.redelivered()
    }

    /// The message priority, if the publisher set one.
    pub fn priority(&self) -> Option<u8> {
        self.metadata.priority()
    }
}

impl<T> Deref for Delivery<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.payload
    }
}
