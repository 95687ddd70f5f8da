//! An outgoing message with options, ready to publish.

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};

use super::Publisher;
use crate::broker;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::headers;

/// A serialized message with its routing key and properties, ready to send.
pub(super) struct Prepared {
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
        let (body, properties, id) = self.publisher.prepare(self.event, &self.options)?;
        Ok(Prepared {
            routing_key: routing_key.to_owned(),
            body,
            properties,
            id,
            mandatory: !self.options.allow_unroutable,
        })
    }
}
