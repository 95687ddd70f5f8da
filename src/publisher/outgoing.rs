//! An outgoing message with options, ready to publish.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};

use super::Publisher;
use crate::broker;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::headers;
use crate::topology::delay;

/// A serialized message with its routing key and properties, ready to send.
pub(super) struct Prepared {
    /// When a delayed message is due; the tier it enters is chosen just before it is
    /// sent, so that waiting for a connection or the rate limit does not lengthen the delay.
    pub(super) due: Option<SystemTime>,
    /// Where it goes first: a delay tier's exchange (set when it is sent); `None` for the
    /// publisher's exchange.
    pub(super) via: Option<String>,
    pub(super) routing_key: String,
    pub(super) body: Vec<u8>,
    pub(super) properties: BasicProperties,
    pub(super) id: String,
    pub(super) mandatory: bool,
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
    /// Held by the broker until then.
    pub(crate) delay: Option<Delay>,
}

/// When a delayed message is due.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Delay {
    For(Duration),
    Until(SystemTime),
}

/// A message being prepared by [`Publisher::message`] or
/// [`Context::message`](crate::Context::message); [`send`](Outgoing::send) publishes it
/// and waits for its confirm, [`Pipeline::send_message`](crate::Pipeline::send_message)
/// publishes it without waiting.
#[must_use = "a message is only published by .send().await"]
#[derive(Debug)]
pub struct Outgoing<'a, E> {
    pub(super) publisher: &'a Publisher,
    pub(super) event: &'a E,
    pub(super) options: MessageOptions,
}

impl<'a, E: Event> Outgoing<'a, E> {
    pub(crate) fn with_options(
        publisher: &'a Publisher,
        event: &'a E,
        options: MessageOptions,
    ) -> Self {
        Outgoing {
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

    /// Have the broker hold the message for `delay` before routing it: it reaches its
    /// queues no earlier than `delay` after the publish, and at most
    /// [`DELAY_PRECISION`](crate::DELAY_PRECISION) (100 ms, the rounding) plus the broker's
    /// own latency later. The wait is in durable broker queues (a cascade of time-to-live
    /// tiers, declared on first use), so it survives restarts of every process and of the
    /// broker. Up to [`MAX_DELAY`](crate::MAX_DELAY) (≈ 77.7 days); longer is an
    /// [`Error::Config`].
    ///
    /// A delayed message cannot be withdrawn, and its routing is checked when it comes
    /// due, not at the publish: one no queue takes then is dropped by the broker.
    ///
    /// ```no_run
    /// # use rabbitry::{Event, Publisher};
    /// # use std::time::Duration;
    /// # #[derive(serde::Serialize)] struct PaymentReminder { order_id: u64 }
    /// # impl Event for PaymentReminder { const TYPE: &'static str = "payment.reminder"; }
    /// # async fn run(publisher: Publisher) -> rabbitry::Result<()> {
    /// let reminder = PaymentReminder { order_id: 1001 };
    /// publisher.message(&reminder).delay(Duration::from_secs(15 * 60)).send().await?;
    /// # Ok(()) }
    /// ```
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(Delay::For(delay));
        self
    }

    /// Have the broker hold the message until `time` (see [`delay`](Outgoing::delay)); a
    /// time already past publishes at once. The delay is computed from this machine's
    /// clock when the message is sent.
    pub fn at(mut self, time: SystemTime) -> Self {
        self.options.delay = Some(Delay::Until(time));
        self
    }

    /// Publish and wait for the broker's confirm; returns the message id.
    pub async fn send(self) -> Result<String> {
        let prepared = self.prepare()?;
        self.publisher.send_prepared(prepared).await
    }

    /// Check the options, serialize the event and build its properties.
    pub(super) fn prepare(&self) -> Result<Prepared> {
        if let Some(key) = &self.options.bad_header {
            return Err(Error::Config(format!(
                "header key '{}…' is {} bytes; AMQP allows at most 255",
                key.chars().take(32).collect::<String>(),
                key.len()
            )));
        }
        let routing_key = self.options.routing_key.as_deref().unwrap_or(E::TYPE);
        broker::short("routing key", routing_key)?;
        let now = SystemTime::now();
        let (due, wait) = match self.options.delay {
            None => (None, Duration::ZERO),
            Some(Delay::For(d)) => (now.checked_add(d), d),
            Some(Delay::Until(t)) => (Some(t), t.duration_since(now).unwrap_or_default()),
        };
        // Refused now if the broker cannot hold it; routed when sent.
        let delayed = delay::route(self.publisher.exchange(), wait)?.is_some();
        let (body, properties, id) = self.publisher.prepare(self.event, &self.options)?;
        Ok(Prepared {
            due: due.filter(|_| delayed),
            via: None,
            routing_key: routing_key.to_owned(),
            body,
            properties,
            id,
            mandatory: !self.options.allow_unroutable,
        })
    }
}
