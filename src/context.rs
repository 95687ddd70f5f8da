//! What a handler can reach besides its delivery.

use std::sync::Arc;

use crate::error::Result;
use crate::event::Event;
use crate::message::Metadata;
use crate::publisher::{MessageOptions, Outgoing, Publisher};

/// Given to every handler run: publishes follow-up events that stay correlated with the
/// message being handled.
///
/// Follow-up events carry the incoming message's correlation id, or its message id when it
/// has none, so a chain of events can be traced back to the first one.
#[derive(Debug)]
pub struct Context {
    publisher: Publisher,
    metadata: Arc<Metadata>,
}

impl Context {
    pub(crate) fn new(publisher: Publisher, metadata: Arc<Metadata>) -> Context {
        Context {
            publisher,
            metadata,
        }
    }

    /// Publish a follow-up event and wait for the broker's confirm; returns its message id.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<String> {
        self.message(event).send().await
    }

    /// Start a follow-up message with options (priority, headers, …); the correlation id is
    /// already set and can be overridden.
    pub fn message<'a, E: Event>(&'a self, event: &'a E) -> Outgoing<'a, E> {
        let options = MessageOptions {
            correlation_id: Some(self.correlation_id().to_owned()),
            ..MessageOptions::default()
        };
        Outgoing::with_options(&self.publisher, event, options)
    }

    /// The correlation id follow-up events get.
    pub fn correlation_id(&self) -> &str {
        self.metadata.conversation_id()
    }

    /// The name of the worker handling the message (its queue).
    pub fn worker(&self) -> &str {
        self.metadata.queue()
    }

    /// The runtime's publisher, for messages that should not be correlated.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }
}
