//! Publishing recorded events again, as new messages that name the original.

use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::AMQPValue;
use rabbitry::{Publisher, headers};

use crate::{REPLAYED_FROM, StoredEvent};

/// The properties of a replayed copy of `event`: a new message id, and
/// [`REPLAYED_FROM`] naming the original (so the keeper does not audit it twice); a copy
/// sent to one worker's queue still shows the worker its original exchange and routing key,
/// as a retry copy does.
pub fn replayed_properties(event: &StoredEvent) -> BasicProperties {
    let mut table = event.headers().cloned().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    table.insert(REPLAYED_FROM.into(), text(&event.message_id));
    table.insert(headers::ORIGINAL_EXCHANGE.into(), text(&event.exchange));
    table.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text(&event.routing_key),
    );
    let id = uuid::Uuid::now_v7().to_string();
    event
        .properties
        .clone()
        .with_message_id(id.as_str().into())
        .with_headers(table)
}

/// A replay that stopped: how many went out before `error`.
#[derive(Debug)]
pub struct ReplayError {
    /// Events replayed before the failure.
    pub replayed: usize,
    /// The message id of the event that failed.
    pub message_id: String,
    /// Why it failed.
    pub error: rabbitry::Error,
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replaying {} stopped after {}: {}",
            self.message_id, self.replayed, self.error
        )
    }
}

impl std::error::Error for ReplayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Publish `events` again, in order, each confirmed: to `worker`'s queue only when given,
/// otherwise to its own exchange with its routing key (every subscriber). Returns the new
/// message ids.
pub async fn replay(
    publisher: &Publisher,
    events: &[StoredEvent],
    worker: Option<&str>,
) -> Result<Vec<String>, ReplayError> {
    let mut ids = Vec::with_capacity(events.len());
    for event in events {
        let (exchange, key) = match worker {
            Some(worker) => ("", worker),
            None => (event.exchange.as_str(), event.routing_key.as_str()),
        };
        let properties = replayed_properties(event);
        let id = properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        if let Err(error) = publisher
            .publish_raw(exchange, key, &event.body, properties)
            .await
        {
            return Err(ReplayError {
                replayed: ids.len(),
                message_id: event.message_id.clone(),
                error,
            });
        }
        ids.push(id);
    }
    Ok(ids)
}
